"""Defaults the keystore owns, each written once: the keystore is the lowest layer, so the
broker's settings and services import these (through ``keystore``) rather than repeat
them."""

DEFAULT_DEVICE_PREFIX = "losant"  # device topics are PREFIX/<device id>/...
DEFAULT_POOL_SIZE = 10  # PostgreSQL connections per process, at most
DEFAULT_STATEMENT_TIMEOUT = 5.0  # seconds before PostgreSQL cancels a statement
# Seconds between two looks at the change marker (SQLite has nothing to push; on
# PostgreSQL the poll backs up LISTEN/NOTIFY).
DEFAULT_CHANGE_POLL_INTERVAL = 0.25
