"""Domain errors of sessions and the state store. Edges map them to HTTP (API) or messages (UI) in one place."""

from __future__ import annotations

from typing import Any


def first_line(exc: BaseException) -> str:
    """An exception's first line of text, or its type's name when it has none: what a one-line log or
    message says of it (a database error's text runs to several lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class StateStoreError(Exception):
    """Base class. `code` is stable and machine-readable; `status` is the HTTP status edges use."""

    code = "state_store_error"
    status = 400

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidState(StateStoreError):
    code = "invalid_state"
    status = 400


class StateTooLarge(InvalidState):
    code = "state_too_large"
    status = 413


class StateTooDeep(InvalidState):
    code = "state_too_deep"
    status = 400


class NotFound(StateStoreError):
    code = "not_found"
    status = 404


class SessionNotFound(NotFound):
    code = "session_not_found"


class VersionNotFound(NotFound):
    code = "version_not_found"


class VersionConflict(StateStoreError):
    """The caller's expected head is stale: nothing was written."""

    code = "version_conflict"
    status = 409


class HeadNotKept(StateStoreError):
    """A trim whose list of versions to keep leaves out the session's head: a trim never moves the
    head (rewind first to go back). Nothing was removed."""

    code = "head_not_kept"
    status = 400


class SessionExists(StateStoreError):
    """A new session (a fork) was asked for under an external id the project already has."""

    code = "session_exists"
    status = 409


class SecretShownOnce(StateStoreError):
    """A retry of a request that made a secret (an API key): the secret is not kept, so the first
    answer cannot be given again, and a second key is not made."""

    code = "secret_shown_once"
    status = 409


class IdempotencyKeyReused(StateStoreError):
    """The same idempotency key was sent before with a different payload."""

    code = "idempotency_key_reused"
    status = 422


class WriteRemoved(StateStoreError):
    """A retry whose first call's version has since been removed (a trim, retention): writing it again
    would put an old state on top of what was written since, so nothing is written."""

    code = "written_then_removed"
    status = 409


class ReasonRequired(StateStoreError):
    code = "reason_required"
    status = 400


class LastAdmin(StateStoreError):
    """A change of members (one removed or demoted, an account deleted) that would leave a project with
    no admin who can sign in, so nobody to manage its members and keys: refused, nothing changed."""

    code = "last_admin"
    status = 409


class SessionArchived(StateStoreError):
    code = "session_archived"
    status = 409


class IntegrityProblem(StateStoreError):
    """Stored data does not match its checksum. Never served; names the version."""

    code = "integrity_error"
    status = 500


class VersionDamaged(StateStoreError):
    """A rewind or fork to a version whose stored state fails its checksum: refused, since the copy
    would be a head nobody can read."""

    code = "version_damaged"
    status = 409


class StillDamaged(StateStoreError):
    """An integrity problem cannot be closed while its version still fails verification."""

    code = "still_damaged"
    status = 409


class JobNotFound(NotFound):
    code = "job_not_found"


class StorageFull(StateStoreError):
    """The disk under VAR_DIR (exports, uploads) has no room left: nothing was kept."""

    code = "storage_full"
    status = 507


class ImportRejected(StateStoreError):
    """An import file failed verification (checksum, format or state): nothing was stored."""

    code = "import_rejected"
    status = 422
