"""What the sync and async clients share: request descriptions, the retry policy, response decoding.

Every endpoint method is written once (in `client.Endpoints`) and returns a `Call`; each client
runs a `Call` its own way (blocking or awaited), with the same retries and the same errors.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from session_rewind_client.errors import NotFound, SessionRewindError, TransportError, ValidationError, error_for

API_PREFIX = "/api/v1"
# json.dumps' `default`: turns a value JSON has no type for into one it has, or raises TypeError.
JsonDefault = Callable[[Any], Any]
# Throttled, and the answers of a server (or the proxy before it) that is restarting or has lost its
# database for a moment. Not 500: a bug answers the same way however often it is asked.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Brackets, in a call's path, a session id that is not one (a UUID): Call.check refuses the call.
NOT_AN_ID = "\x00"


def _json_body(response: httpx.Response) -> Any:
    if response.status_code == 204 or not response.content:
        return None
    return response.json()


@dataclass(frozen=True)
class Call:
    """One API request, described before it is sent (so it can be retried identically)."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    decode: Callable[[httpx.Response], Any] = _json_body

    @property
    def is_write(self) -> bool:
        return self.method in WRITE_METHODS

    def check(self) -> None:
        """NotFound for a path built from a session id that is not one (see client._sid): raised as the
        call runs, not as it is made, so an async client's refusal comes when its call is awaited."""
        if NOT_AN_ID in self.path:
            asked = self.path.split(NOT_AN_ID)[1]
            raise NotFound(f"no session {asked}: session ids are UUIDs", code="session_not_found")

    def body(self, json_default: JsonDefault | None = None) -> bytes | None:
        """The request body, encoded once before the first attempt. A value JSON cannot carry (NaN,
        an infinity, a lone surrogate, an object of no JSON type that `json_default` does not turn
        into one), or two keys of one object that JSON would spell alike (1 and "1"), is a
        ValidationError raised here, before anything is sent, like every other refusal."""
        if self.json is None:
            return self.content
        try:
            # Keys sorted (the server sorts them anyway; ~2-6 % of the encoding): sorting is what notices
            # an object whose keys are of several types, the only kind in which two keys can become one.
            return _encoded(self.json, sort_keys=True, default=json_default)
        except TypeError:  # keys of several types in one object (what _encoded lets through)
            clash = key_clash_at(self.json, json_default)
            if clash:
                raise ValidationError(f"the request cannot be sent as JSON: {clash}") from None
            # Keys of several types, each spelled its own way.
            return _encoded(self.json, sort_keys=False, default=json_default)

    def prepared_headers(self) -> dict[str, str]:
        """Headers for every attempt of this call: one idempotency key across all retries."""
        headers = dict(self.headers)
        if self.json is not None:
            headers["Content-Type"] = "application/json"
        if self.is_write:
            headers["Idempotency-Key"] = self.idempotency_key or str(uuid.uuid4())
        return headers

    def query(self) -> dict[str, Any] | None:
        if not self.params:
            return None
        return {key: value for key, value in self.params.items() if value is not None}


def _encoded(body: Any, *, sort_keys: bool, default: JsonDefault | None = None) -> bytes:
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False, sort_keys=sort_keys,
                          default=default).encode()
    except RecursionError:
        raise ValidationError("the request cannot be sent as JSON: it nests deeper than Python can encode "
                              "(a state may nest 200 levels, the server's STATE_MAX_DEPTH)") from None
    except TypeError as exc:
        if sort_keys and _MIXED_KEYS in str(exc):
            raise  # Call.body looks for keys that would clash (key_clash_at), then encodes them unsorted
        raise ValidationError(f"the request cannot be sent as JSON: {exc}{_where(body, exc, default)}") from None
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValidationError(f"the request cannot be sent as JSON: {exc}{_where(body, exc, default)}") from None


def _where(body: Any, exc: Exception, default: JsonDefault | None) -> str:
    return "" if "Circular reference" in str(exc) else unencodable_at(body, default)


# What sorting the keys of an object raises when they are of several types (1 and "a").
_MIXED_KEYS = "not supported between instances of"
# What json.dumps encodes itself (subclasses included); anything else goes to its `default`.
_JSON_TYPES = (dict, list, tuple, str, int, float, type(None))


def _key_text(key: Any) -> Any:
    """The name json.dumps gives an object's key (1 -> "1", True -> "true", None -> "null")."""
    if isinstance(key, str):
        return key
    if key is True or key is False or key is None:
        return json.dumps(key)
    if isinstance(key, (int, float)):
        return json.dumps(key, allow_nan=True)
    return key  # not a JSON key: json.dumps names it (see unencodable_at)


def key_clash_at(body: Any, default: JsonDefault | None = None) -> str:
    """Two keys of one object that JSON spells alike (1 and "1", True and "true"), and where: sent as
    they are, the object would carry one name twice, and the server keeps the last, so the value of
    the other would be lost without a word. "" if there are none."""
    for value, path in _walk(body, default):
        if not isinstance(value, dict):
            continue
        named: dict[Any, Any] = {}
        for key in value:
            text = _key_text(key)
            try:
                if text in named:
                    return (f"the keys {named[text]!r} and {key!r} would both be sent as {json.dumps(text)} "
                            f"(at {path or '/'}), and one value would be lost")
                named[text] = key
            except TypeError:  # an unhashable name: no JSON key, refused by json.dumps with its path
                continue
    return ""


def _walk(body: Any, default: JsonDefault | None = None) -> Iterator[tuple[Any, str]]:
    """Every value of a body with its JSON pointer, in document order, as json.dumps sees it: a value
    of no JSON type as `default` turns it into one (or as it is, where `default` refuses it); a
    container met again (the same object twice, or a cycle) is not walked again."""
    seen: set[int] = set()
    converted: list[Any] = []  # what `default` made, kept alive: `seen` holds ids
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        value, path = stack.pop()
        if default is not None and not isinstance(value, _JSON_TYPES):
            try:
                value = default(value)
                converted.append(value)
            except (TypeError, ValueError):
                pass  # json.dumps refuses it: unencodable_at names it
        if isinstance(value, (dict, list, tuple)):
            if id(value) in seen:
                continue
            seen.add(id(value))
        yield value, path
        if isinstance(value, dict):
            stack.extend((item, f"{path}/{_pointer_token(key)}") for key, item in reversed(list(value.items())))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, f"{path}/{index}") for index, item in reversed(list(enumerate(value))))


def _pointer_token(key: Any) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _encodes(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, int)


def unencodable_at(body: Any, default: JsonDefault | None = None) -> str:
    """Where in a body json.dumps refused (" at /state/log/3"), which its message never says: in a
    large state the engine could not tell which value was a datetime, a set or a NaN."""
    for value, path in _walk(body, default):
        if isinstance(value, dict):
            for key in reversed(list(value)):
                if not _encodes(key):
                    return f" (a key {key!r} at {path or '/'})"
        elif not isinstance(value, (list, tuple)) and not _encodes(value):
            return f" (a {type(value).__name__} at {path or '/'})"
    return ""


@dataclass(frozen=True)
class RetryPolicy:
    """Retries 429, 502, 503 and 504 (and lost connections) with exponential backoff and jitter.

    A server's Retry-After longer than the computed delay is waited instead; a shorter one (0, or a
    date already past) is not taken as leave to retry at once, which spent every retry in a moment
    against a server or proxy that kept answering so. One longer than `max_wait` is not waited
    for: the error is raised at once (a 429 as RateLimited with its `retry_after`). Writes are retried
    with the same Idempotency-Key, so a retry of a write that did land returns the first answer.
    The defaults ride out 16 to 32 s of outage (a web restart, a database failover): six retries
    waiting 0.25-0.5, 0.5-1, 1-2, 2-4, 4-8 and 8-16 s. Each wait is at least half its backoff: with
    waits anywhere from 0 (full jitter) the six could all be short, and then a restart of a few
    seconds, refusing connections meanwhile, failed the engine's call. All of it stays within the
    client's `deadline` (see `CallBudget`): a wait that would end after it is not begun. A 429 is
    retried until that deadline rather than `max_retries` times (see THROTTLED_BACKOFF_STEPS).
    """

    max_retries: int = 6
    backoff: float = 0.5
    max_wait: float = 30.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        backoff = self.backoff * (2**attempt)
        computed = min(self.max_wait, random.uniform(backoff / 2, backoff))
        hinted = retry_after_seconds(response) if response is not None else None
        return computed if hinted is None else max(hinted, computed)  # at most max_wait: retry_wait refused longer


def retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def base_url_from(base_url: str | None) -> str:
    url = (base_url or os.environ.get("SESSION_REWIND_URL") or "http://127.0.0.1:8000").strip().rstrip("/")
    if not url.lower().startswith(("http://", "https://")):
        # Refused here: every request would fail, and only after the retries meant for an outage.
        raise ValueError(f"the Session Rewind URL must start with http:// or https://, e.g. http://{url}")
    if not url.endswith(API_PREFIX):
        url += API_PREFIX
    return url + "/"


def api_key_from(api_key: str | None) -> str | None:
    """The key, without the line end a key read from a file or a pasted one brings along."""
    key = (api_key or os.environ.get("SESSION_REWIND_API_KEY") or "").strip()
    if not key:
        return None
    if not key.isascii() or not key.isprintable() or any(char.isspace() for char in key):
        # Named without the key itself: it is a secret. Such a header can never be sent.
        raise ValueError("the API key holds spaces or characters an API key never has; copy it again")
    return key


def default_headers(api_key: str | None, user_agent: str) -> dict[str, str]:
    headers = {"Accept": "application/json", "User-Agent": user_agent}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


DEFAULT_DEADLINE = 60.0


class CallBudget:
    """The time one call may take in all: every attempt, and every wait between attempts.

    Without it a server that accepts connections but never answers (hung on a lock, a proxy waiting
    on a dead upstream) cost each call 7 attempts of the full request timeout, 30 s each: an engine
    stalled for minutes before hearing of it. Each attempt's timeouts are cut to the time left, and
    no retry is begun that could not start before the deadline. `deadline=None`: no overall limit.
    """

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.started = time.monotonic()
        self.ends = None if deadline is None else self.started + deadline

    def left(self) -> float | None:
        return None if self.ends is None else self.ends - time.monotonic()

    def timeout(self, configured: httpx.Timeout) -> httpx.Timeout:
        """The client's timeouts, none longer than the time left."""
        left = self.left()
        if left is None:
            return configured
        left = max(left, 0.001)

        def cap(value: float | None) -> float:
            return left if value is None else min(value, left)

        return httpx.Timeout(connect=cap(configured.connect), read=cap(configured.read),
                             write=cap(configured.write), pool=cap(configured.pool))

    def passed(self) -> bool:
        left = self.left()
        return left is not None and left <= 0

    def spent(self) -> str:
        return f"{time.monotonic() - self.started:.1f} s"


# A 429 is not an outage: the server is up and asks for less. It is retried until the deadline, not
# max_retries times (engines sharing a key under a steady limit gave up after ~22 s of a 60 s deadline),
# its backoff growing no further than this step's (2-4 s by default) unless Retry-After asks for more.
THROTTLED_BACKOFF_STEPS = 3


def retry_wait(attempt: int, policy: RetryPolicy, response: httpx.Response | None, budget: CallBudget) -> float | None:
    """Seconds to wait before the next attempt, or None: no retry, the caller hears what this one got."""
    throttled = response is not None and response.status_code == 429
    if attempt >= policy.max_retries and not (throttled and budget.deadline is not None):
        return None
    hinted = retry_after_seconds(response) if response is not None else None
    if response is not None:
        if hinted is not None and hinted > policy.max_wait:
            # The server says no sooner than that: retrying earlier is certain to fail again, so the
            # caller gets the error now (a 429's RateLimited carries `retry_after`).
            return None
        if response.status_code not in RETRY_STATUSES and not _in_progress(response):
            return None
    # Else the connection was lost: safe for reads, and for writes because the key makes them idempotent.
    wait = policy.delay(min(attempt, THROTTLED_BACKOFF_STEPS) if throttled else attempt, response)
    left = budget.left()
    if left is None:
        return wait
    if left <= 0 or ((throttled or hinted is not None) and wait >= left):
        # The server's Retry-After ends after the deadline: waiting for it cannot help. Nor can a
        # throttled call's retry begun in the last moments (it ended as a timeout, not RateLimited).
        return None
    return min(wait, left / 2)  # a backoff is a guess: leave the retry time to be answered


def _in_progress(response: httpx.Response) -> bool:
    """409 request_in_progress: an earlier attempt with this Idempotency-Key is still being served
    (its answer was lost to us); waiting and retrying gets that answer."""
    if response.status_code != 409:
        return False
    try:
        return response.json().get("code") == "request_in_progress"
    except ValueError:
        return False


def deleted_by_earlier_attempt(call: Call, attempt: int, response: httpx.Response) -> bool:
    """A retried DELETE that finds nothing: the attempt whose answer was lost did the deleting."""
    return call.method == "DELETE" and attempt > 0 and response.status_code == 404


def raise_for(response: httpx.Response) -> None:
    if 300 <= response.status_code < 400 and response.status_code != 304:
        raise redirected(response)
    if response.status_code < 400:
        return
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            problem = {"detail": str(problem)}
    except ValueError:
        problem = {"detail": response.text[:500] or response.reason_phrase}
    if not isinstance(problem.get("code"), str) and response.status_code < 500 and response.status_code != 429:
        # Not the API's problem (each has a code): a proxy's or another site's page. Raised as NotFound,
        # a wrong base URL read as "no such session", and an engine that recreates what is missing did so.
        raise not_the_api(response.request.method, response) from None
    raise error_for(response.status_code, problem, retry_after=retry_after_seconds(response))


def not_the_api(method: str, response: httpx.Response, why: str = "") -> SessionRewindError:
    kind = response.headers.get("Content-Type") or "no Content-Type"
    detail = (f"{method} {response.request.url} answered {response.status_code} with {kind}, not the Session Rewind "
              f"API's JSON{why}: is the client's URL the API's? It began {response.content[:200]!r}")
    return SessionRewindError(detail, status=response.status_code, code="invalid_response")


def decoded(call: Call, response: httpx.Response) -> Any:
    """The call's answer. One that is not the API's JSON (a proxy's or another site's HTML page,
    answered 200) is a SessionRewindError saying so, like every other failure, not a JSONDecodeError."""
    try:
        return call.decode(response)
    except (ValueError, TypeError) as exc:
        raise not_the_api(call.method, response, f" ({exc})") from None


def undecodable(call: Call, exc: httpx.DecodingError) -> SessionRewindError:
    """An answer whose body its own Content-Encoding cannot decode (a proxy that mislabels or cuts a
    compressed body): an error of this client's kind like every other failure, not httpx's, which an
    engine's ``except SessionRewindError`` let through. A write may have been done: repeat it with its
    idempotency_key."""
    detail = (f"{call.method} {call.path} was answered with a body that could not be decoded ({exc}): "
              "is something between the client and the API rewriting answers?")
    return SessionRewindError(detail, code="invalid_response")


def redirected(response: httpx.Response) -> SessionRewindError:
    """A redirect is not followed (a 301/302 would turn a write into a GET, and the key might go to
    another host), nor taken for an answer: its empty body used to come back as None, so a write the
    server never made looked done. The error names where the server pointed."""
    request = response.request
    where = response.headers.get("Location") or "nowhere"
    detail = (f"{request.method} {request.url} was answered {response.status_code} {response.reason_phrase}, "
              f"a redirect to {where}; nothing was done. Give the client the URL the API is really at "
              "(https://?), and paths their trailing slash")
    return SessionRewindError(detail, status=response.status_code, code="redirected",
                              problem={"detail": detail, "location": response.headers.get("Location")})


def transport_heals(exc: httpx.TransportError) -> bool:
    """False for a request httpx refused to send (a URL it cannot reach, a header it cannot write):
    sending it again fails the same way, so it is not retried."""
    return not isinstance(exc, (httpx.UnsupportedProtocol, httpx.LocalProtocolError))


def transport_error(call: Call, exc: httpx.TransportError, budget: CallBudget, attempts: int) -> SessionRewindError:
    tried = f"{attempts} attempt{'s' if attempts != 1 else ''} in {budget.spent()}"
    if budget.deadline is not None and budget.passed():
        tried += f", the client's deadline ({budget.deadline:g} s) passed"
    try:
        # The whole URL: a client made without one (nor SESSION_REWIND_URL) quietly talks to
        # 127.0.0.1:8000, and "POST sessions/ failed: connection refused" did not say so.
        url: Any = exc.request.url
    except RuntimeError:  # httpx refused it before it was a request
        url = call.path
    return TransportError(f"{call.method} {url} failed ({tried}): {exc!r}")


def deadline_passed(request: httpx.Request) -> httpx.TimeoutException:
    return httpx.ReadTimeout("the client's deadline passed while the answer was arriving", request=request)


def relative(path_or_url: str) -> str:
    """Paths are relative to the API root; `next` links may be absolute URLs (httpx takes both)."""
    if path_or_url.startswith(("http://", "https://")):
        return path_or_url
    return path_or_url.lstrip("/").removeprefix(API_PREFIX.lstrip("/") + "/")
