"""The exceptions bulksend raises.

Every message names the resource it is about (a file and line, a config key, an account),
so the CLI can print it as one line and exit 1::

    BulksendError                 root: any operational failure the user can act on
    ├── ConfigError               bulksend.toml is missing, malformed or invalid
    ├── StoreError                the database cannot be opened, migrated or written
    ├── ImportFileError           a subscriber file cannot be imported as a whole
    ├── AddressError              an email address given by the user is not valid
    ├── TemplateError             a campaign template fails to compile, is unsafe or unrenderable
    ├── NotFound                  a named list, subscriber, campaign or account does not exist
    └── StateError                an operation is illegal in the resource's current state
"""

from __future__ import annotations


class BulksendError(Exception):
    """An operational failure with a one-line, resource-naming message."""


class ConfigError(BulksendError):
    """The configuration file is missing, malformed or has an invalid value."""


class StoreError(BulksendError):
    """The database cannot be opened, migrated or written."""


class ImportFileError(BulksendError):
    """A subscriber file cannot be imported as a whole (not text, no email column, ...)."""


class AddressError(BulksendError):
    """An email address given on the command line is not valid."""


class TemplateError(BulksendError):
    """A campaign template does not compile, uses an unknown variable or breaks the sandbox."""


class NotFound(BulksendError):
    """A named list, subscriber, campaign or account does not exist."""


class StateError(BulksendError):
    """An operation is illegal in the resource's current state."""
