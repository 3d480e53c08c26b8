"""Python client for the Session Rewind API (sync `Client`, async `AsyncClient`), with engine integrations
in `session_rewind_client.llamaindex` and `session_rewind_client.langgraph` (optional extras)."""

__version__ = "0.1.0"

from session_rewind_client._core import RetryPolicy
from session_rewind_client.client import AsyncClient, Client
from session_rewind_client.errors import (
    AuthenticationError,
    ConflictError,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    RateLimited,
    ServerError,
    SessionRewindError,
    TransportError,
    ValidationError,
)

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "ConflictError",
    "NotFound",
    "PermissionDenied",
    "PreconditionFailed",
    "RateLimited",
    "RetryPolicy",
    "ServerError",
    "SessionRewindError",
    "TransportError",
    "ValidationError",
]
