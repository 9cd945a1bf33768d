"""Fixtures shared by every test: the store on SQLite and PostgreSQL, and real loopback servers."""

pytest_plugins = [
    "tests.support.certs",
    "tests.support.store",
    "tests.support.cli",
    "tests.support.smtpserver",
    "tests.support.dovecot",
    "tests.support.dnsserver",
]
