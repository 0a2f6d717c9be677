"""Generation and verification of access-key credentials.

The secret exists only in the value returned at creation; the database keeps a random
per-key salt and HMAC-SHA256(salt, secret). A fast hash is the right choice here: the
secret is 256 bits from ``secrets.token_urlsafe(32)``, so there is nothing to
brute-force and a slow password hash (argon2, bcrypt) would only cost CONNECT latency
and hand attackers a cheap CPU-exhaustion lever. The salt stops precomputation and
makes identical secrets (there will be none) hash differently.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_HEX_LEN = 32  # secrets.token_hex(16): 128 bits
SALT_BYTES = 16

# Hashing against this when the key is unknown gives unknown keys and wrong secrets the
# same cost (docs/access.md#connect), so timing does not reveal which keys exist.
_DUMMY_SALT = secrets.token_bytes(SALT_BYTES)
_DUMMY_HASH = hmac.new(_DUMMY_SALT, secrets.token_bytes(32), hashlib.sha256).digest()


def new_key() -> str:
    return secrets.token_hex(KEY_HEX_LEN // 2)


def new_object_id() -> str:
    """An id for applications (and later keys and tokens): 24 hex characters, like
    Losant's (MongoDB ObjectId-shaped) ids; random, not a timestamp."""
    return secrets.token_hex(12)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> tuple[bytes, bytes]:
    """Return (salt, hash) to store for a freshly generated secret."""
    salt = secrets.token_bytes(SALT_BYTES)
    return salt, _digest(salt, secret)


def verify_secret(secret: str, salt: bytes | None, stored_hash: bytes | None) -> bool:
    """Constant-time check; with salt/stored_hash None (unknown key) it does the same work
    against a dummy and returns False."""
    if salt is None or stored_hash is None:
        hmac.compare_digest(_digest(_DUMMY_SALT, secret), _DUMMY_HASH)
        return False
    return hmac.compare_digest(_digest(salt, secret), stored_hash)


def _digest(salt: bytes, secret: str) -> bytes:
    # surrogatepass: a malformed password from the wire must fail to match, not raise.
    return hmac.new(salt, secret.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
