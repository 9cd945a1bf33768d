"""The schema: every table of DESIGN §3, as SQLAlchemy Core tables.

Times are stored as seconds since the epoch (double precision): the sender compares them
on every claim, limits count them in windows, and tests drive them with a fake clock, so a
plain number works the same on SQLite and PostgreSQL. States are checked by the database.

`migrations/` holds the authoritative DDL; `tests/test_store.py` checks that migrating an
empty database yields exactly these tables, so the two never drift apart.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)

# Named constraints let Alembic alter SQLite tables (batch mode) and keep names stable.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

MEMBER_STATUSES = ("subscribed", "unsubscribed")
SUPPRESSION_REASONS = (
    "unsubscribe", "hard_bounce", "complaint", "manual", "dead_domain", "blocklist",
)
CAMPAIGN_STATUSES = ("draft", "scheduled", "running", "paused", "finished", "cancelled")
DELIVERY_STATES = (
    "queued", "claimed", "sending", "sent", "failed", "deferred",
    "expired", "suppressed", "unknown", "cancelled",
)
TERMINAL_DELIVERY_STATES = ("sent", "failed", "expired", "suppressed", "unknown", "cancelled")
ACCOUNT_STATES = ("active", "cooldown", "disabled", "exhausted")
BOUNCE_KINDS = ("hard", "soft", "complaint", "unsubscribe", "block", "autoreply", "unknown",
                "delayed")
BOUNCE_SOURCES = ("dsn", "arf", "smtp", "mailto", "web", "manual")

Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite aliases only INTEGER to rowid


def _one_of(column: str, values: tuple[str, ...], name: str) -> CheckConstraint:
    quoted = ", ".join(f"'{value}'" for value in values)
    return CheckConstraint(f"{column} IN ({quoted})", name=name)


lists = Table(
    "lists",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("created_at", Double, nullable=False),
)

subscribers = Table(
    "subscribers",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("email", String(320), nullable=False),  # as given
    Column("email_key", String(320), nullable=False, unique=True),  # lower-case, IDNA domain
    Column("name", String(500), nullable=False, server_default=""),
    Column("attributes", JSON, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
)

list_members = Table(
    "list_members",
    metadata,
    Column("list_id", Id, ForeignKey("lists.id", ondelete="CASCADE"), nullable=False),
    Column("subscriber_id", Id, ForeignKey("subscribers.id", ondelete="CASCADE"), nullable=False),
    Column("status", String(20), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    PrimaryKeyConstraint("list_id", "subscriber_id"),
    _one_of("status", MEMBER_STATUSES, "status"),
    Index(None, "subscriber_id"),
)

campaigns = Table(
    "campaigns",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("subject", Text, nullable=False),
    Column("html_template", Text, nullable=False),
    Column("text_template", Text),  # None: generated from the HTML
    Column("from_address", String(500)),  # None: [sender] from
    Column("status", String(20), nullable=False, server_default="draft"),
    Column("send_at", Double),
    Column("pause_reason", Text),
    Column("no_dkim", Boolean, nullable=False, server_default="0"),
    Column("settings", JSON, nullable=False),  # room for per-campaign options
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("started_at", Double),
    Column("finished_at", Double),
    _one_of("status", CAMPAIGN_STATUSES, "status"),
)

campaign_lists = Table(
    "campaign_lists",
    metadata,
    Column("campaign_id", Id, ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False),
    Column("list_id", Id, ForeignKey("lists.id", ondelete="RESTRICT"), nullable=False),
    PrimaryKeyConstraint("campaign_id", "list_id"),
)

suppressions = Table(
    "suppressions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("email_key", String(320), unique=True),
    Column("domain", String(255), unique=True),  # IDNA A-label, lower-case
    Column("reason", String(20), nullable=False),
    Column("source", Text, nullable=False, server_default=""),
    Column("campaign_id", Id, ForeignKey("campaigns.id", ondelete="SET NULL")),
    Column("created_at", Double, nullable=False),
    _one_of("reason", SUPPRESSION_REASONS, "reason"),
    CheckConstraint("(email_key IS NULL) <> (domain IS NULL)", name="address_or_domain"),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("campaign_id", Id, ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False),
    Column("subscriber_id", Id, ForeignKey("subscribers.id", ondelete="CASCADE"), nullable=False),
    Column("email", String(320), nullable=False),  # the address at queueing time
    Column("email_key", String(320), nullable=False),
    Column("state", String(20), nullable=False, server_default="queued"),
    Column("account", String(200)),  # the account it is claimed for or went through
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Double, nullable=False),
    Column("lease_owner", String(200)),
    Column("lease_token", String(64)),
    Column("lease_expires_at", Double),
    Column("message_id", String(500)),
    Column("smtp_code", Integer),
    Column("smtp_enhanced", String(20)),
    Column("smtp_text", Text),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("sent_at", Double),
    UniqueConstraint("campaign_id", "subscriber_id"),
    _one_of("state", DELIVERY_STATES, "state"),
    # The claim query: due rows of running campaigns, oldest first.
    Index(None, "state", "next_attempt_at"),
    # Progress counts per campaign and state.
    Index(None, "campaign_id", "state"),
    # Lease recovery: claimed/sending rows whose lease has expired.
    Index(None, "lease_expires_at"),
    # Bounce matching by address.
    Index(None, "email_key"),
)

# The quota ledger: one row per attempt on an account. A claim reserves capacity by
# inserting a row; it is released (deleted) only when the session never reached MAIL FROM.
# A retry through another account therefore keeps counting against the first one.
delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("delivery_id", Id, ForeignKey("deliveries.id", ondelete="CASCADE"), nullable=False),
    Column("account", String(200), nullable=False),
    Column("reserved_at", Double, nullable=False),
    Column("finished_at", Double),
    Column("outcome", String(20)),  # the delivery state the attempt led to
    Column("smtp_code", Integer),
    Column("smtp_enhanced", String(20)),
    Column("smtp_text", Text),
    # Window counts: attempts of one account since a moment.
    Index(None, "account", "reserved_at"),
    Index(None, "delivery_id"),
)

account_state = Table(
    "account_state",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("state", String(20), nullable=False, server_default="active"),
    Column("until", Double),
    Column("reason", Text),
    Column("failures", Integer, nullable=False, server_default="0"),  # consecutive, for backoff
    Column("rr_current", Double, nullable=False, server_default="0"),  # smooth weighted RR
    Column("sent", BigInteger, nullable=False, server_default="0"),
    Column("failed", BigInteger, nullable=False, server_default="0"),
    Column("blocked", BigInteger, nullable=False, server_default="0"),  # 5.7.x replies
    Column("last_error", Text),
    Column("updated_at", Double, nullable=False),
    # The block-rate guard counts mail handed over since then (set when it disables).
    Column("guard_since", Double),
    _one_of("state", ACCOUNT_STATES, "state"),
)

bounce_events = Table(
    "bounce_events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("kind", String(20), nullable=False),
    Column("status", String(20)),  # enhanced status code, e.g. 5.1.1
    Column("diagnostic", Text),
    Column("source", String(20), nullable=False),
    Column("source_key", String(500), nullable=False),  # the mail's Message-ID or digest
    Column("email_key", String(320), nullable=False, server_default=""),
    Column("delivery_id", Id, ForeignKey("deliveries.id", ondelete="SET NULL")),
    Column("campaign_id", Id, ForeignKey("campaigns.id", ondelete="SET NULL")),
    Column("created_at", Double, nullable=False),
    # Re-processing the same mail records nothing twice.
    UniqueConstraint("source_key", "email_key", "kind"),
    _one_of("kind", BOUNCE_KINDS, "kind"),
    _one_of("source", BOUNCE_SOURCES, "source"),
    Index(None, "campaign_id", "kind"),
    Index(None, "email_key", "kind", "created_at"),
    # Guards count events per delivery; deleting deliveries sets this column to NULL.
    Index(None, "delivery_id"),
)

# POP3 has no flags: the UIDLs already processed are remembered here.
mailbox_seen = Table(
    "mailbox_seen",
    metadata,
    Column("mailbox", String(500), nullable=False),  # user@host:port
    Column("uid", String(200), nullable=False),
    Column("processed_at", Double, nullable=False),
    PrimaryKeyConstraint("mailbox", "uid"),
)
