"""keybroker's keystore: applications, devices, access keys and tokens in one SQLite file or
one PostgreSQL database (no MQTT here).

async with KeyStore.open(path_or_postgresql_url) as ks:
    key, secret = await ks.create_key(device_tags=["floor=1"])
"""

from keystore.defaults import (
    DEFAULT_CHANGE_POLL_INTERVAL,
    DEFAULT_DEVICE_PREFIX,
    DEFAULT_POOL_SIZE,
    DEFAULT_STATEMENT_TIMEOUT,
)
from keystore.errors import (
    ConfigError,
    ConflictError,
    KeybrokerError,
    LimitError,
    NotFoundError,
    ValidationError,
)
from keystore.keys import UNSET
from keystore.models import AccessKey, AddressMode, Device, KeyStatus, Tag, TopicMode, iso
from keystore.query import compile_query
from keystore.store import KeyStore
from keystore.validation import (
    parse_tag,
    validate_address,
    validate_custom_filter,
    validate_device_id,
    validate_tag,
)

__all__ = [
    "DEFAULT_CHANGE_POLL_INTERVAL",
    "DEFAULT_DEVICE_PREFIX",
    "DEFAULT_POOL_SIZE",
    "DEFAULT_STATEMENT_TIMEOUT",
    "UNSET",
    "AccessKey",
    "AddressMode",
    "ConfigError",
    "ConflictError",
    "Device",
    "KeyStatus",
    "KeyStore",
    "KeybrokerError",
    "LimitError",
    "NotFoundError",
    "Tag",
    "TopicMode",
    "ValidationError",
    "compile_query",
    "iso",
    "parse_tag",
    "validate_address",
    "validate_custom_filter",
    "validate_device_id",
    "validate_tag",
]
