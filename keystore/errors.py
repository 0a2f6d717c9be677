"""The one exception hierarchy for every user-facing keybroker error.

Messages are one line and name the bad value and the reason, e.g.
``invalid CIDR '10.0.0.0/33': prefix length must be 0-32``.
The CLI maps any KeybrokerError to a one-line message and a non-zero exit.
"""


class KeybrokerError(Exception):
    """Base of every error a user can cause."""


class ValidationError(KeybrokerError):
    """Input rejected before anything was written."""


class NotFoundError(KeybrokerError):
    """A device or key that does not exist (or an ambiguous key prefix)."""


class ConflictError(KeybrokerError):
    """Uniqueness or immutability violated (duplicate id/name, device restriction change)."""


class LimitError(KeybrokerError):
    """A configured limit (e.g. max_keys) would be exceeded."""


class ConfigError(KeybrokerError):
    """A bad setting (config file, environment or flags); the CLI exits with code 2."""


class UnavailableError(KeybrokerError):
    """The keystore's database cannot be reached now (a PostgreSQL server that is down or
    not answering): nothing was decided, try again later."""
