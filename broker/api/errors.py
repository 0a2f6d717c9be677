"""Errors of the HTTP API, in Losant's shape: ``{"type": ..., "message": ...}``."""

from __future__ import annotations

from typing import Any

from keystore.errors import (
    ConfigError,
    ConflictError,
    KeybrokerError,
    LimitError,
    NotFoundError,
    UnavailableError,
    ValidationError,
)


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"type": self.kind, "message": self.message}


def bad_request(message: str) -> ApiError:
    return ApiError(400, "Validation", message)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "Unauthorized", message, {"WWW-Authenticate": "Bearer"})


def forbidden(message: str) -> ApiError:
    return ApiError(403, "Forbidden", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "NotFound", message)


def too_many(message: str, retry_after: int) -> ApiError:
    return ApiError(429, "TooManyRequests", message, {"Retry-After": str(retry_after)})


_STATUS: list[tuple[type[KeybrokerError], int, str]] = [
    (ValidationError, 400, "Validation"),
    (ConfigError, 400, "Validation"),
    (LimitError, 400, "LimitExceeded"),
    (NotFoundError, 404, "NotFound"),
    (ConflictError, 409, "Conflict"),
    (UnavailableError, 503, "ServiceUnavailable"),
]


def from_keystore(exc: KeybrokerError) -> ApiError:
    """The API error for a keystore refusal (its one-line message is kept as it is)."""
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            return ApiError(status, kind, str(exc))
    return ApiError(400, "Validation", str(exc))
