"""The commented bulksend.toml that `bulksend init` writes: every key, its values, its default.

It parses as written, with no environment variable and no key file. Optional sections are
commented out line by line as `#key = value`: deleting the `#` is all it takes to use them
(tests uncomment them all and parse the result). Prose comments start with `# `.
"""

EXAMPLE_CONFIG = """\
# bulksend.toml: written by `bulksend init`. Every key is listed with what it does, the values
# it accepts and its default. Optional settings are commented out as `#key = value`: delete
# the leading `#` to use one. Unknown keys are refused, so a typo cannot pass unnoticed.
#
# Secrets never go in this file: a key ending in _env names the environment variable that
# holds the secret (a key like `password` is refused).
# Durations are written "30s", "5m", "72h", "30d", "1h30m", or as an integer of seconds.

# Where bulksend keeps its state (a SQLAlchemy URL). Required. A relative SQLite path is
# relative to this file, so cron finds the same database from any directory. For several
# workers on several machines use PostgreSQL: "postgresql+psycopg://user@host/dbname".
database = "sqlite:///bulksend.db"

# IANA time zone of `send_at` times written without an offset, and the zone in which
# calendar windows reset ("Europe/Moscow", "America/New_York", ...). Default "UTC".
timezone = "UTC"

# Who the mail is from and how recipients unsubscribe. Needed to send campaigns.
[sender]
from = "Example News <news@example.com>"   # From header: an address, optionally with a name. Required.
#reply_to = "support@example.com"          # Reply-To header (a name is allowed). Default: none.
list_id = "news.example.com"               # List-Id header: a domain-like name for this list. Required.
return_path = "bounces@example.com"        # envelope sender; bounces return to bounces+TOKEN@example.com,
                                           #   so that mailbox must accept "+" addresses. Required.
unsubscribe_url = "https://example.com/u"  # public http(s) URL of `bulksend serve`; unsubscribe links
                                           #   are URL/TOKEN (one-click, RFC 8058). Required.
#unsubscribe_mailto = "unsubscribe@example.com"   # adds a mailto: to List-Unsubscribe. Default: none.
secret_env = "BULKSEND_SECRET"             # env var holding the key that signs unsubscribe and bounce
                                           #   tokens; keep it stable. Default "BULKSEND_SECRET".

# DKIM signing: one [[dkim]] block per signing domain. Optional (default: no signing).
# `bulksend dkim keygen example.com s2026` writes a key and prints its DNS TXT record.
#[[dkim]]
#domain = "example.com"                    # the signing domain (d=). Each domain once.
#selector = "s2026"                        # the selector (s=): the TXT record is s2026._domainkey.example.com
#private_key_file = "dkim/example.com.pem" # PEM key, relative to this file: RSA of 2048 bits or more, or
                                           #   Ed25519 (PKCS#1 or PKCS#8, unencrypted).

# Retries and crash recovery.
[delivery]
max_attempts = 8        # attempts per recipient before it is `failed`; an integer >= 1. Default 8.
retry_after = "5m"      # wait before the first retry; it doubles each time, up to 4000s. Default "5m".
give_up_after = "72h"   # how long a deferred recipient is retried before it is `expired`.
                        #   Default "72h".
lease = "5m"            # how long a worker owns a claimed message; a crashed worker's claims return
                        #   to the queue after this. Default "5m".
one_cpu = true          # a `send` worker keeps its threads on one CPU (its sessions hand Python's
                        #   lock to each other at every socket call: on one CPU that costs ~40 %
                        #   less CPU a message). Set false when several workers share a machine
                        #   with few CPUs. Default true.

# SMTP accounts, one [[accounts]] block each, used round-robin in this order (weighted by
# `weight`) and never past their limits. Sending needs at least one.
#
# A mailbox at a provider, implicit TLS on port 465:
#[[accounts]]
#name = "yandex-1"               # unique; letters, digits, ".", "_", "-". Required.
#host = "smtp.yandex.ru"         # SMTP server host name or IP. Required.
#port = 465                      # 1-65535. Default: 465 for tls, 587 for starttls, 25 for none.
#security = "tls"                # "tls" (implicit TLS), "starttls" or "none". Required.
#allow_insecure = false          # must be true for security = "none", which then refuses AUTH
                                 #   (no password in clear). Default false.
#ca_file = ""                    # CA bundle (relative to this file) for a relay with a private
                                 #   certificate; "" = the system CAs. Default "".
#username = "news@yandex.ru"     # AUTH user; username and password_env go together; omit both
                                 #   for a relay without AUTH. Default: none.
#password_env = "YANDEX1_PASSWORD"   # env var holding the AUTH password. Default: none.
#from = "News <news@yandex.ru>"  # From for this account, for providers that rewrite it.
                                 #   Default: [sender] from.
#limits = ["20/minute", "100/hour", "500/day"]   # every one must have room before a send: "N/second",
                                 #   "N/minute", "N/hour", "N/day" or "N/<duration>" like "50/5m".
                                 #   Default [] (no limit).
#window = "rolling"              # "rolling" counts the last N seconds; "calendar" resets at the start
                                 #   of each minute/hour/day in `timezone` (limits per minute, hour or
                                 #   day only). Default "rolling".
#connections = 2                 # parallel SMTP connections. Default 1.
#messages_per_connection = 100   # messages before reconnecting. Default 100.
#weight = 1                      # share of the rotation relative to other accounts. Default 1.
#helo = "mail.example.com"       # name sent in EHLO. Default: this machine's name.
#
# A relay on the submission port with STARTTLS and a daily quota that resets at midnight:
#[[accounts]]
#name = "relay-1"
#host = "smtp.example.net"
#port = 587
#security = "starttls"
#username = "news@example.net"
#password_env = "RELAY1_PASSWORD"
#limits = ["1000/day"]
#window = "calendar"
#connections = 4

# The mailbox that receives bounces, complaints and mailto unsubscribes
# (`bulksend bounces fetch`). Optional.
#[bounces]
#protocol = "imap"               # "imap" or "pop3". Required.
#host = "imap.example.com"       # Required.
#security = "tls"                # "tls", "starttls" or "none" (needs allow_insecure = true). Required.
#port = 993                      # Default: imap 993 (tls) / 143; pop3 995 (tls) / 110.
#allow_insecure = false          # Default false.
#ca_file = ""                    # CA bundle for a private certificate; "" = the system CAs. Default "".
#username = "bounces@example.com"        # Required.
#password_env = "BOUNCES_PASSWORD"       # env var holding the mailbox password. Required.
#folder = "INBOX"                # IMAP folder to read. Default "INBOX".
#quarantine_folder = "bulksend-quarantine"   # where unparseable messages go (IMAP; kept on POP3).
                                 #   Default "bulksend-quarantine".
#soft_bounce_limit = 3           # soft bounces within soft_bounce_window that suppress an address.
                                 #   Default 3.
#soft_bounce_window = "30d"      # Default "30d".

# DNS servers for dead-domain (MX) checks, "ip" or "ip:port" ("[::1]:53" for IPv6).
# Optional; default [] = the system resolver.
#[dns]
#nameservers = ["127.0.0.1:5353"]

# The unsubscribe web app (`bulksend serve`).
[server]
listen = "127.0.0.1:8025"       # "host:port" or "[ipv6]:port". Default "127.0.0.1:8025".
"""
