"""`Client` (blocking) and `AsyncClient` (asyncio) for the Session Rewind REST API.

Both expose the same methods with the same arguments; the async ones are awaited. Writes carry an
Idempotency-Key (generated, or yours via ``idempotency_key=``) that stays the same across retries.
Each call, its retries and the waits between them included, ends within the client's ``deadline``
(60 s unless given; ``timeout`` is for one attempt).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from datetime import datetime
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from session_rewind_client import __version__
from session_rewind_client._core import (
    DEFAULT_DEADLINE,
    NOT_AN_ID,
    Call,
    CallBudget,
    JsonDefault,
    RetryPolicy,
    api_key_from,
    base_url_from,
    deadline_passed,
    decoded,
    default_headers,
    deleted_by_earlier_attempt,
    raise_for,
    relative,
    retry_wait,
    transport_error,
    transport_heals,
    undecodable,
)

USER_AGENT = f"session-rewind-client/{__version__}"
R = TypeVar("R")
JOB_DONE = frozenset({"done", "failed"})


def _sid(session_id: Any) -> str:
    """A session's id for a request's path. The API's ids are UUIDs; anything else is refused, as the
    API would (NotFound), before it is sent (Call.check, as the call runs): quoted or not, a `/` in it
    reaches the server as one (servers decode `%2F` before routing), so an id taken from input could
    call another endpoint."""
    try:
        return str(session_id if isinstance(session_id, uuid.UUID) else uuid.UUID(str(session_id)))
    except ValueError:
        return f"{NOT_AN_ID}{session_id!r}{NOT_AN_ID}"


def _drop_none(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def _when(moment: datetime | str | None) -> str | None:
    return moment.isoformat() if isinstance(moment, datetime) else moment


def _with_etag(response: httpx.Response) -> dict[str, Any] | None:
    if response.status_code == 304:
        return None
    body = response.json()
    if isinstance(body, dict) and "etag" not in body and response.headers.get("ETag"):
        body["etag"] = response.headers["ETag"]
    return body


def _session_created(response: httpx.Response) -> dict[str, Any]:
    """The session, with ``created``: True when this call made it (201), False when it existed (200)."""
    body = response.json()
    body["created"] = response.status_code == 201
    return body


def _next_call(page: dict[str, Any], first: Call) -> Call | None:
    """The request for the page after `page`: `next` is a link or a bare cursor."""
    following = page.get("next")
    if not following:
        return None
    # This server sends bare base64 cursors (which never hold "?"); a link is followed as it is.
    if isinstance(following, str) and (following.startswith(("http://", "https://")) or "?" in following):
        return Call("GET", relative(following))
    return Call("GET", first.path, params={**(first.params or {}), "cursor": following})


def _walk_params(filters: dict[str, Any]) -> dict[str, Any]:
    """The query of a walk over every session: in creation order unless the caller names an order.
    The list's default order is by activity (-updated_at), so a session written while the walk went on
    moved above its cursor and was never listed: a sweep over a busy project missed the very sessions
    its engines were writing."""
    params = _drop_none(**filters)
    params.setdefault("ordering", "created_at")
    return params


def _if_match(etag: str | None) -> dict[str, str]:
    """The headers of a write that must follow the head whose ``etag`` is given (none without one)."""
    return {"If-Match": etag} if etag else {}


def _refuse_ignored(http: Any, **given: Any) -> None:
    """With ``http=`` the client sends through that httpx client as it is: a `base_url`, `api_key` or
    `transport` given beside it went unused, so an engine passing its key there was quietly
    unauthenticated (401 not_authenticated, the key it gave never sent)."""
    ignored = [name for name, value in given.items() if value is not None]
    if http is not None and ignored:
        raise ValueError(f"{', '.join(ignored)} would be ignored beside http=: give them to that httpx client "
                         "(base_url ending in /api/v1/, an Authorization: Bearer header), or leave http= out")


class Endpoints(Generic[R]):
    """Every endpoint, described once. `_run` is the sync or async executor, and `R` what each
    method returns: the answer (`Client`), or a coroutine to await for it (`AsyncClient`, so that a
    type checker flags a call whose ``await`` was forgotten: that write never happens)."""

    def _run(self, call: Call) -> R:  # pragma: no cover - provided by the concrete clients
        raise NotImplementedError

    # -- sessions --------------------------------------------------------------------------------

    def create_session(
        self,
        external_id: str,
        *,
        workflow: str | None = None,
        metadata: dict[str, Any] | None = None,
        tags: list[str] | None = None,
        idempotency_key: str | None = None,
    ) -> R:
        """The session with this external id, created if new; ``["created"]`` says which."""
        body = _drop_none(external_id=external_id, workflow=workflow, metadata=metadata, tags=tags)
        return self._run(Call("POST", "sessions/", json=body, idempotency_key=idempotency_key, decode=_session_created))

    def list_sessions(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        tag: str | None = None,
        q: str | None = None,
        cursor: str | None = None,
        **filters: Any,
    ) -> R:
        """One page: ``{"results": [...], "next": ...}``. Use `iter_sessions` to walk them all."""
        params = _drop_none(status=status, workflow=workflow, tag=tag, q=q, cursor=cursor, **filters)
        return self._run(Call("GET", "sessions/", params=params))

    def get_session(self, session_id: Any) -> R:
        return self._run(Call("GET", f"sessions/{_sid(session_id)}/"))

    def update_session(
        self,
        session_id: Any,
        *,
        status: str | None = None,
        workflow: str | None = None,
        metadata: dict[str, Any] | None = None,
        tags: list[str] | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> R:
        body = _drop_none(status=status, workflow=workflow, metadata=metadata, tags=tags, **fields)
        return self._run(Call("PATCH", f"sessions/{_sid(session_id)}/", json=body, idempotency_key=idempotency_key))

    def delete_session(self, session_id: Any, *, reason: str, idempotency_key: str | None = None) -> R:
        """Delete the session and its versions (admin); `reason` goes into the audit log."""
        params = _drop_none(reason=reason)
        return self._run(
            Call("DELETE", f"sessions/{_sid(session_id)}/", params=params, idempotency_key=idempotency_key)
        )

    def archive_session(self, session_id: Any, *, reason: str | None = None, idempotency_key: str | None = None) -> R:
        """Keep the history, refuse new writes."""
        return self._run(Call("POST", f"sessions/{_sid(session_id)}/archive/", json=_drop_none(reason=reason),
                              idempotency_key=idempotency_key))

    def unarchive_session(self, session_id: Any, *, reason: str | None = None, idempotency_key: str | None = None) -> R:
        """Accept writes again (audited)."""
        return self._run(Call("POST", f"sessions/{_sid(session_id)}/unarchive/", json=_drop_none(reason=reason),
                              idempotency_key=idempotency_key))

    # -- versions --------------------------------------------------------------------------------

    def record(
        self,
        session_id: Any,
        state: dict[str, Any],
        *,
        step: str | None = None,
        status: str | None = None,
        error: str | None = None,
        label: str | None = None,
        engine: str | None = None,
        engine_version: str | None = None,
        tags: list[str] | None = None,
        expected_version: int | None = None,
        if_match: str | None = None,
        idempotency_key: str | None = None,
    ) -> R:
        """Push a snapshot: it becomes the session's new head version (201 with its metadata, and its
        ``etag`` for the next write's ``if_match``)."""
        body = _drop_none(
            state=state, step=step, status=status, error=error, label=label, engine=engine,
            engine_version=engine_version, tags=tags, expected_version=expected_version,
        )
        headers = _if_match(if_match)
        return self._run(
            Call("POST", f"sessions/{_sid(session_id)}/versions/", json=body, headers=headers,
                 idempotency_key=idempotency_key, decode=_with_etag)
        )

    def record_batch(
        self,
        session_id: Any,
        snapshots: list[dict[str, Any]],
        *,
        expected_version: int | None = None,
        if_match: str | None = None,
        idempotency_key: str | None = None,
    ) -> R:
        """Record many snapshots (each a dict with `state` and optional metadata) in order, all or nothing.
        ``if_match`` (a head's ``etag``) or ``expected_version`` pins the head the first one follows.
        Returns ``{"versions": [...], "etag": ...}``, the ``etag`` the new head's (the next batch's ``if_match``)."""
        body = _drop_none(versions=snapshots, expected_version=expected_version)
        headers = _if_match(if_match)
        return self._run(Call("POST", f"sessions/{_sid(session_id)}/versions/batch/", json=body, headers=headers,
                              idempotency_key=idempotency_key, decode=_with_etag))

    def update_version(
        self,
        session_id: Any,
        number: int,
        *,
        pinned: bool | None = None,
        label: str | None = None,
        idempotency_key: str | None = None,
    ) -> R:
        """Pin/unpin or label a version (both survive retention). Audited."""
        body = _drop_none(pinned=pinned, label=label)
        return self._run(Call("PATCH", f"sessions/{_sid(session_id)}/versions/{int(number)}/", json=body,
                              idempotency_key=idempotency_key))

    def pin(self, session_id: Any, number: int, *, pinned: bool = True, idempotency_key: str | None = None) -> R:
        return self.update_version(session_id, number, pinned=pinned, idempotency_key=idempotency_key)

    def label(self, session_id: Any, number: int, label: str, *, idempotency_key: str | None = None) -> R:
        return self.update_version(session_id, number, label=label, idempotency_key=idempotency_key)

    def list_versions(self, session_id: Any, *, cursor: str | None = None, **filters: Any) -> R:
        """One page of version metadata, newest first."""
        params = _drop_none(cursor=cursor, **filters)
        return self._run(Call("GET", f"sessions/{_sid(session_id)}/versions/", params=params))

    def get_version(self, session_id: Any, number: int) -> R:
        """A version's metadata and its state."""
        return self._run(Call("GET", f"sessions/{_sid(session_id)}/versions/{int(number)}/"))

    def head(self, session_id: Any, *, if_none_match: str | None = None) -> R:
        """The head version's metadata and state; ``etag`` is what `If-Match` expects.

        With ``if_none_match=<etag>`` it answers None while the head has not moved: a cheap way for
        an engine to notice an operator's rewind.
        """
        headers = {"If-None-Match": if_none_match} if if_none_match else {}
        return self._run(Call("GET", f"sessions/{_sid(session_id)}/head/", headers=headers, decode=_with_etag))

    def diff(
        self, session_id: Any, from_version: int, to_version: int, *, to_session: Any = None,
        structural_strings: bool | None = None, limit: int | None = None, offset: int | None = None,
    ) -> R:
        """``{"changes": [{"path", "op", "old", "new"}], "patch": [...], "total", "next_offset"}``
        between two versions. ``structural_strings=False`` compares strings that hold JSON as plain
        strings. ``limit``/``offset`` read a large diff a page at a time (``patch`` is then None)."""
        params = _drop_none(
            to_session=str(to_session) if to_session is not None else None,
            structural_strings=None if structural_strings is None else str(bool(structural_strings)).lower(),
            limit=limit, offset=offset,
        )
        params.update({"from": int(from_version), "to": int(to_version)})
        return self._run(Call("GET", f"sessions/{_sid(session_id)}/diff/", params=params))

    def rewind(
        self,
        session_id: Any,
        to_version: int,
        *,
        reason: str,
        expected_version: int | None = None,
        if_match: str | None = None,
        idempotency_key: str | None = None,
    ) -> R:
        """Append a new head equal to `to_version` (history is kept); returns the new head, with its
        ``etag``. ``if_match`` (a head's ``etag``) or ``expected_version`` names the head it must follow."""
        body = _drop_none(to_version=to_version, reason=reason, expected_version=expected_version)
        headers = _if_match(if_match)
        return self._run(
            Call("POST", f"sessions/{_sid(session_id)}/rewind/", json=body, headers=headers,
                 idempotency_key=idempotency_key, decode=_with_etag)
        )

    def fork(
        self,
        session_id: Any,
        from_version: int,
        *,
        reason: str,
        external_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> R:
        """Start a new session whose first version is `from_version`; returns the new session.
        `reason` goes into the audit log."""
        body = _drop_none(from_version=from_version, external_id=external_id, reason=reason)
        return self._run(
            Call("POST", f"sessions/{_sid(session_id)}/fork/", json=body, idempotency_key=idempotency_key)
        )

    def trim(
        self, session_id: Any, keep: list[int], *, reason: str, expected_version: int | None = None,
        if_match: str | None = None, idempotency_key: str | None = None,
    ) -> R:
        """Remove every version except the numbers in `keep`, which must name the head (admin; audited).
        Pinned and labelled versions, sources of other sessions' forks and what a kept rewind restored
        stay too. ``if_match`` (a head's ``etag``) or ``expected_version`` names the head it must follow.
        Returns ``{"removed": [...], "kept": [...], "protected": [...]}``; a repeat removes nothing."""
        body = _drop_none(keep=sorted(set(keep)), reason=reason, expected_version=expected_version)
        return self._run(Call("POST", f"sessions/{_sid(session_id)}/trim/", json=body, headers=_if_match(if_match),
                              idempotency_key=idempotency_key))

    # -- projects, API keys, audit log -----------------------------------------------------------

    def list_projects(self, *, cursor: str | None = None) -> R:
        return self._run(Call("GET", "projects/", params=_drop_none(cursor=cursor)))

    def get_project(self, slug: str) -> R:
        return self._run(Call("GET", f"projects/{quote(slug, safe='')}/"))

    def list_api_keys(self, *, project: str | None = None, status: str | None = None,
                      creator_status: str | None = None, cursor: str | None = None) -> R:
        """Keys of the projects the caller administers; ``status`` (active, expiring, expired, revoked) and
        ``creator_status`` (admin, not_admin, deactivated, no_account) narrow them."""
        params = _drop_none(project=project, status=status, creator_status=creator_status, cursor=cursor)
        return self._run(Call("GET", "keys/", params=params))

    def create_api_key(self, name: str, *, scopes: list[str], project: str | None = None,
                       expires_at: datetime | str | None = None, never_expires: bool = False,
                       idempotency_key: str | None = None) -> R:
        """A new key (admin); its secret is in ``["key"]`` of this answer only. It expires at
        ``expires_at`` (an aware datetime or ISO 8601 text), never with ``never_expires``, else after the
        server's default lifetime."""
        if never_expires and expires_at is not None:
            raise ValueError("give expires_at or never_expires, not both")
        body = _drop_none(name=name, scopes=scopes, project=project, expires_at=_when(expires_at))
        if never_expires:
            body["expires_at"] = None
        return self._run(Call("POST", "keys/", json=body, idempotency_key=idempotency_key))

    def get_api_key(self, key_id: int) -> R:
        return self._run(Call("GET", f"keys/{int(key_id)}/"))

    def set_api_key_expiry(self, key_id: int, expires_at: datetime | str | None, *,
                           idempotency_key: str | None = None) -> R:
        """Move a key's expiry (admin; None: never): an expired key so extended works again. Audited."""
        return self._run(Call("PATCH", f"keys/{int(key_id)}/", json={"expires_at": _when(expires_at)},
                              idempotency_key=idempotency_key))

    def revoke_api_key(self, key_id: int, *, idempotency_key: str | None = None) -> R:
        return self._run(Call("DELETE", f"keys/{int(key_id)}/", idempotency_key=idempotency_key))

    def list_audit_events(
        self,
        *,
        project: str | None = None,
        action: str | None = None,
        session: Any = None,
        cursor: str | None = None,
        **filters: Any,
    ) -> R:
        """Who rewound, forked, fixed or deleted what, and why (newest first)."""
        params = _drop_none(project=project, action=action, session=str(session) if session else None,
                            cursor=cursor, **filters)
        return self._run(Call("GET", "audit-events/", params=params))

    # -- operations: retention, compaction, export/import, jobs, integrity -------------------------

    def get_retention_policy(self, *, project: str | None = None) -> R:
        return self._run(Call("GET", "retention-policy/", params=_drop_none(project=project)))

    def set_retention_policy(
        self,
        *,
        enabled: bool,
        keep_last: int,
        keep_days: int,
        thin_to: str,
        project: str | None = None,
        idempotency_key: str | None = None,
    ) -> R:
        """Replace the project's policy (admin). Pinned/labelled versions, heads and fork/rewind sources are kept."""
        body = _drop_none(enabled=enabled, keep_last=keep_last, keep_days=keep_days, thin_to=thin_to, project=project)
        return self._run(Call("PUT", "retention-policy/", json=body, idempotency_key=idempotency_key))

    def compact(
        self,
        *,
        dry_run: bool = True,
        apply_retention: bool = True,
        project: str | None = None,
        idempotency_key: str | None = None,
    ) -> R:
        """A dry run's prediction (what would be removed and freed), or the queued job (``dry_run=False``)."""
        body = _drop_none(dry_run=dry_run, apply_retention=apply_retention, project=project)
        return self._run(Call("POST", "compaction/", json=body, idempotency_key=idempotency_key))

    def start_export(
        self, *, session: Any = None, project: str | None = None, skip_damaged: bool = False,
        idempotency_key: str | None = None,
    ) -> R:
        """Queue an export (one session, or the whole project); returns the job. ``skip_damaged``: a
        project's export leaves out sessions with an open integrity problem (its result lists them)."""
        body = _drop_none(session=str(session) if session is not None else None, project=project,
                          skip_damaged=skip_damaged or None)
        return self._run(Call("POST", "exports/", json=body, idempotency_key=idempotency_key))

    def download_export(self, job_id: int) -> R:
        """The finished export file (NDJSON bytes)."""
        return self._run(Call("GET", f"jobs/{int(job_id)}/file/", decode=lambda response: response.content))

    def start_import(
        self, export_file: bytes, *, project: str | None = None, skip_existing: bool = False,
        idempotency_key: str | None = None,
    ) -> R:
        """Upload an export file and queue its verified, all-or-nothing import; returns the job.
        ``skip_existing``: leave out sessions whose external id the project has already (listed in the
        job's result) instead of refusing the import."""
        params = _drop_none(project=project, skip_existing="true" if skip_existing else None)
        return self._run(Call("POST", "imports/", params=params, content=export_file,
                              headers={"Content-Type": "application/x-ndjson"}, idempotency_key=idempotency_key))

    def list_jobs(self, *, kind: str | None = None, status: str | None = None, project: str | None = None,
                  cursor: str | None = None) -> R:
        return self._run(Call("GET", "jobs/", params=_drop_none(kind=kind, status=status, project=project, cursor=cursor)))

    def get_job(self, job_id: int) -> R:
        """A job with its progress (``done``, ``total``, ``percent``) and, when finished, ``result``."""
        return self._run(Call("GET", f"jobs/{int(job_id)}/"))

    def list_integrity_problems(self, *, open: bool | None = None, project: str | None = None,
                                cursor: str | None = None) -> R:
        params = _drop_none(open=None if open is None else str(open).lower(), project=project, cursor=cursor)
        return self._run(Call("GET", "integrity-problems/", params=params))

    def resolve_integrity_problem(self, problem_id: int, *, resolution: str, idempotency_key: str | None = None) -> R:
        """Close an integrity problem once its version verifies again (restore the data first);
        ConflictError ``still_damaged`` otherwise. `resolution` goes into the audit log."""
        return self._run(Call("POST", f"integrity-problems/{int(problem_id)}/resolve/", json={"resolution": resolution},
                              idempotency_key=idempotency_key))

    def start_integrity_scrub(self, *, project: str | None = None, idempotency_key: str | None = None) -> R:
        """Queue a verification of every stored version; returns the job."""
        return self._run(Call("POST", "integrity-scrub/", params=_drop_none(project=project),
                              idempotency_key=idempotency_key))

    # -- generic escape hatch -------------------------------------------------------------------

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None,
                idempotency_key: str | None = None) -> R:
        """Any other endpoint, with the same auth, retries and errors (path relative to /api/v1/)."""
        return self._run(Call(method.upper(), relative(path), params=params, json=json,
                              idempotency_key=idempotency_key))


class Client(Endpoints[Any]):
    """Blocking client. Use as a context manager, or call `close()`.

    `timeout` bounds each attempt (connecting, each read, each write); `deadline` bounds a whole
    call, its retries and waits included: past it the call raises what its last attempt got
    (`TransportError` for a server that never answered). None: no overall limit.

    `json_default` is json.dumps' `default` for every request body: it is given each value JSON has
    no type for (a datetime, set, bytes, a pydantic model...) and returns one JSON has (or raises
    TypeError: the call's ValidationError then names where the value is). Without it such a value is
    that ValidationError, and nothing is sent.

    >>> with Client("http://127.0.0.1:8000", api_key="sr_...") as rewind:
    ...     session = rewind.create_session("run-42")
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        deadline: float | None = DEFAULT_DEADLINE,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        http: httpx.Client | None = None,
        json_default: JsonDefault | None = None,
    ) -> None:
        _refuse_ignored(http, base_url=base_url, api_key=api_key, transport=transport)
        self.retry = retry or RetryPolicy()
        self.deadline = deadline
        self.json_default = json_default
        self._http = http or httpx.Client(
            base_url=base_url_from(base_url),
            headers=default_headers(api_key_from(api_key), USER_AGENT),
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _run(self, call: Call) -> Any:
        call.check()
        body, headers = call.body(self.json_default), call.prepared_headers()
        budget = CallBudget(self.deadline)
        attempt = 0
        while True:
            try:
                response = self._send(call, body, headers, budget)
            except httpx.TransportError as exc:
                wait = retry_wait(attempt, self.retry, None, budget) if transport_heals(exc) else None
                if wait is None:
                    raise transport_error(call, exc, budget, attempt + 1) from exc
                time.sleep(wait)
                attempt += 1
                continue
            except httpx.DecodingError as exc:
                raise undecodable(call, exc) from exc
            wait = retry_wait(attempt, self.retry, response, budget)
            if wait is not None:
                time.sleep(wait)
                attempt += 1
                continue
            if deleted_by_earlier_attempt(call, attempt, response):
                return None
            raise_for(response)
            return decoded(call, response)

    def _send(self, call: Call, body: bytes | None, headers: dict[str, str], budget: CallBudget) -> httpx.Response:
        """One attempt. The body is read a chunk at a time so that a server trickling its answer is
        also cut off at the deadline (each read already waits at most the time left). An answer whose
        last bytes arrive just after the deadline is kept: it is whole, and for a write it says what
        the server did (reporting it failed would make the caller redo a write that landed)."""
        request = self._http.build_request(call.method, call.path, params=call.query(), content=body,
                                           headers=headers, timeout=budget.timeout(self._http.timeout))
        streamed = self._http.send(request, stream=True)
        length = streamed.headers.get("content-length")
        try:
            content = bytearray()
            for chunk in streamed.iter_bytes():
                content += chunk
                if budget.passed() and not (length and str(streamed.num_bytes_downloaded) == length):
                    raise deadline_passed(request)
        finally:
            streamed.close()
        # The same answer, its body read (and decoded: hence no Content-Encoding).
        kept = [(name, value) for name, value in streamed.headers.multi_items() if name.lower() != "content-encoding"]
        response = httpx.Response(streamed.status_code, headers=kept, stream=httpx.ByteStream(bytes(content)),
                                  request=request, extensions=streamed.extensions)
        response.read()
        return response

    def _pages(self, first: Call) -> Iterator[dict[str, Any]]:
        call: Call | None = first
        while call is not None:
            page = self._run(call)
            yield page
            call = _next_call(page, first)

    def wait_for_job(self, job_id: int, *, timeout: float = 300.0, poll: float = 0.5) -> dict[str, Any]:
        """Poll a job until it is finished or failed (TimeoutError after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job["status"] in JOB_DONE:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

    def iter_sessions(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every session matching the filters (status, workflow, tag, q), following cursors, oldest
        first (``ordering=created_at``) unless another ``ordering`` is given (see `_walk_params`)."""
        for page in self._pages(Call("GET", "sessions/", params=_walk_params(filters))):
            yield from page.get("results", [])

    def iter_versions(self, session_id: Any, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every version's metadata, newest first, following cursors."""
        first = Call("GET", f"sessions/{_sid(session_id)}/versions/", params=_drop_none(**filters))
        for page in self._pages(first):
            yield from page.get("results", [])

    def iter_audit_events(self, **filters: Any) -> Iterator[dict[str, Any]]:
        for page in self._pages(Call("GET", "audit-events/", params=_drop_none(**filters))):
            yield from page.get("results", [])

    def iter_jobs(self, **filters: Any) -> Iterator[dict[str, Any]]:
        for page in self._pages(Call("GET", "jobs/", params=_drop_none(**filters))):
            yield from page.get("results", [])


class AsyncClient(Endpoints[Coroutine[Any, Any, Any]]):
    """The same API for asyncio: every endpoint method returns an awaitable (`timeout`, `deadline`
    and `json_default` as on `Client`).

    One client may serve several event loops one after another (a script calling `asyncio.run`
    per job, a test per case): its connections belong to the loop they were opened on, so on a new
    loop it opens new ones. A `transport=` or `http=` of yours cannot be renewed that way: make the
    client inside the loop that uses it, or leave those out.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        deadline: float | None = DEFAULT_DEADLINE,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        http: httpx.AsyncClient | None = None,
        json_default: JsonDefault | None = None,
    ) -> None:
        _refuse_ignored(http, base_url=base_url, api_key=api_key, transport=transport)
        self.retry = retry or RetryPolicy()
        self.deadline = deadline
        self.json_default = json_default
        self._renewable = http is None and transport is None
        url, headers = base_url_from(base_url), default_headers(api_key_from(api_key), USER_AGENT)

        def connect() -> httpx.AsyncClient:
            return httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, transport=transport)

        self._connect = connect
        self._http = http or connect()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop self._http's connections belong to

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._loop is not None and self._loop is not asyncio.get_running_loop() and self._renewable:
            # Its connections died with their loop (closing them now would need that loop).
            self._http, self._loop = self._connect(), None
        try:
            await self._http.aclose()
        except RuntimeError as exc:
            raise self._wrong_loop(exc) from exc

    def _http_for_this_loop(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._renewable:
                # Before anything is sent: httpx wrote the request on the old loop's pooled connection
                # and only then failed ("Event loop is closed"), so the server acted on a request the
                # caller was told had failed.
                raise self._wrong_loop(RuntimeError("this event loop is not the one its connections were opened on"))
            if self._loop is not None:
                # Connections opened on another loop cannot be used on this one (httpx: "Event loop
                # is closed"); that loop's own cleanup, or the garbage collector, closes them.
                self._http = self._connect()
            self._loop = loop
        return self._http

    def _wrong_loop(self, exc: RuntimeError) -> Exception:
        if "loop" not in str(exc):
            return exc
        return RuntimeError(
            f"{exc}: this AsyncClient's transport=/http= was used on another event loop, and its connections "
            "belong to that loop. Make the AsyncClient inside the loop that uses it (e.g. inside the function "
            "asyncio.run runs), or leave transport= and http= out so the client opens new connections itself."
        )

    async def _run(self, call: Call) -> Any:
        call.check()
        body, headers = call.body(self.json_default), call.prepared_headers()
        budget = CallBudget(self.deadline)
        http = self._http_for_this_loop()
        attempt = 0
        while True:
            try:
                response = await self._send(http, call, body, headers, budget)
            except httpx.TransportError as exc:
                wait = retry_wait(attempt, self.retry, None, budget) if transport_heals(exc) else None
                if wait is None:
                    raise transport_error(call, exc, budget, attempt + 1) from exc
                await asyncio.sleep(wait)
                attempt += 1
                continue
            except httpx.DecodingError as exc:
                raise undecodable(call, exc) from exc
            except RuntimeError as exc:
                raise self._wrong_loop(exc) from exc
            wait = retry_wait(attempt, self.retry, response, budget)
            if wait is not None:
                await asyncio.sleep(wait)
                attempt += 1
                continue
            if deleted_by_earlier_attempt(call, attempt, response):
                return None
            raise_for(response)
            return decoded(call, response)

    @staticmethod
    async def _send(http: httpx.AsyncClient, call: Call, body: bytes | None, headers: dict[str, str],
                    budget: CallBudget) -> httpx.Response:
        """One attempt, cut off at the deadline however the server answers (slowly, a byte at a time)."""
        request = http.build_request(call.method, call.path, params=call.query(), content=body, headers=headers,
                                     timeout=budget.timeout(http.timeout))
        try:
            async with asyncio.timeout(budget.left()):
                return await http.send(request)
        except TimeoutError:
            raise deadline_passed(request) from None

    async def _pages(self, first: Call) -> AsyncIterator[dict[str, Any]]:
        call: Call | None = first
        while call is not None:
            page = await self._run(call)
            yield page
            call = _next_call(page, first)

    async def wait_for_job(self, job_id: int, *, timeout: float = 300.0, poll: float = 0.5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = await self.get_job(job_id)
            if job["status"] in JOB_DONE:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            await asyncio.sleep(poll)

    async def iter_sessions(self, **filters: Any) -> AsyncIterator[dict[str, Any]]:
        async for page in self._pages(Call("GET", "sessions/", params=_walk_params(filters))):
            for item in page.get("results", []):
                yield item

    async def iter_versions(self, session_id: Any, **filters: Any) -> AsyncIterator[dict[str, Any]]:
        first = Call("GET", f"sessions/{_sid(session_id)}/versions/", params=_drop_none(**filters))
        async for page in self._pages(first):
            for item in page.get("results", []):
                yield item

    async def iter_audit_events(self, **filters: Any) -> AsyncIterator[dict[str, Any]]:
        async for page in self._pages(Call("GET", "audit-events/", params=_drop_none(**filters))):
            for item in page.get("results", []):
                yield item

    async def iter_jobs(self, **filters: Any) -> AsyncIterator[dict[str, Any]]:
        async for page in self._pages(Call("GET", "jobs/", params=_drop_none(**filters))):
            for item in page.get("results", []):
                yield item
