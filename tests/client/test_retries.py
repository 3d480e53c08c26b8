"""The client's own behaviour on answers a healthy test server does not give on demand (503, a
Retry-After of some seconds, dropped connections): the server side is an httpx mock transport."""

from __future__ import annotations

import asyncio
import json
import pickle
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest
from session_rewind_client import (
    AsyncClient,
    Client,
    ConflictError,
    NotFound,
    PreconditionFailed,
    RateLimited,
    RetryPolicy,
    ServerError,
    SessionRewindError,
    TransportError,
    ValidationError,
)

FAST = RetryPolicy(max_retries=3, backoff=0.001, max_wait=0.05)

SID = "0c6e0f8a-6b0f-4a55-9a8b-3f1d2a4c5e6f"  # a session id: the API's are UUIDs


def problem(status: int, code: str, **extra) -> httpx.Response:
    body = {"type": f"urn:session-rewind:problem:{code}", "title": code, "status": status, "detail": f"{code} happened",
            "code": code, **extra}
    return httpx.Response(status, json=body, headers={"Content-Type": "application/problem+json"})


class Script:
    """Answers requests from a list, and remembers what was asked."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def sync_client(script: Script, **kwargs) -> Client:
    return Client("http://rewind.test", api_key="sr_test", transport=httpx.MockTransport(script), retry=FAST, **kwargs)


def test_write_retries_429_503_and_502_with_one_idempotency_key():
    script = Script(
        problem(429, "throttled"),
        problem(503, "database_unavailable"),
        httpx.Response(502, text="Bad Gateway"),  # a proxy in front of a restarting server
        httpx.Response(201, json={"number": 1}),
    )
    with sync_client(script) as client:
        assert client.record(SID, {"x": 1}) == {"number": 1}
    keys = {request.headers["Idempotency-Key"] for request in script.requests}
    assert len(script.requests) == 4 and len(keys) == 1
    assert script.requests[0].headers["Authorization"] == "Bearer sr_test"
    assert script.requests[0].url.path == f"/api/v1/sessions/{SID}/versions/"


def test_a_write_still_in_progress_is_waited_for_but_a_plain_conflict_is_not():
    script = Script(problem(409, "request_in_progress"), httpx.Response(202, json={"id": 7}),
                    problem(409, "version_conflict"))
    with sync_client(script) as client:
        assert client.start_export(session="abc") == {"id": 7}
        with pytest.raises(ConflictError):
            client.record(SID, {"x": 1})
    assert len(script.requests) == 3
    assert script.requests[0].headers["Idempotency-Key"] == script.requests[1].headers["Idempotency-Key"]


def test_each_call_gets_its_own_key_unless_given():
    script = Script(httpx.Response(201, json={}), httpx.Response(201, json={}), httpx.Response(201, json={}))
    with sync_client(script) as client:
        client.create_session("a")
        client.create_session("a")
        client.create_session("a", idempotency_key="mine")
    first, second, third = (request.headers["Idempotency-Key"] for request in script.requests)
    assert first != second and third == "mine"


def test_reads_carry_no_idempotency_key():
    script = Script(httpx.Response(200, json={"results": [], "next": None}))
    with sync_client(script) as client:
        client.list_sessions(status="running")
    assert "Idempotency-Key" not in script.requests[0].headers
    assert script.requests[0].url.params["status"] == "running"


def test_retry_after_is_honoured(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr("session_rewind_client.client.time.sleep", waits.append)
    script = Script(
        httpx.Response(429, json={"code": "throttled", "detail": "slow down"}, headers={"Retry-After": "7"}),
        httpx.Response(200, json={"id": "s"}),
    )
    client = Client("http://rewind.test", transport=httpx.MockTransport(script), retry=RetryPolicy(max_wait=60))
    assert client.get_session(SID) == {"id": "s"}
    assert waits == [7.0]


@pytest.mark.parametrize("hint", ["0", "-5", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_a_retry_after_of_now_still_waits_the_backoff(monkeypatch, hint):
    """A server or proxy answering 503 with Retry-After 0 (or a time past) spent all six retries in a
    moment, where the backoff rides out half a minute of outage."""
    waits: list[float] = []
    monkeypatch.setattr("session_rewind_client.client.time.sleep", waits.append)
    script = Script(*[httpx.Response(503, text="busy", headers={"Retry-After": hint})] * 3,
                    httpx.Response(200, json={"id": "s"}))
    client = Client("http://rewind.test", transport=httpx.MockTransport(script), retry=RetryPolicy(backoff=1.0))
    assert client.get_session(SID) == {"id": "s"}
    assert len(waits) == 3 and all(wait >= 2**attempt / 2 for attempt, wait in enumerate(waits)), waits


def test_a_retry_after_beyond_max_wait_is_raised_at_once_not_retried_early(monkeypatch):
    """Retrying before the server's Retry-After is certain to fail again: the caller hears at once."""
    waits: list[float] = []
    monkeypatch.setattr("session_rewind_client.client.time.sleep", waits.append)
    script = Script(httpx.Response(429, json={"code": "throttled", "detail": "slow"}, headers={"Retry-After": "57"}),
                    httpx.Response(200, json={"id": "s"}))
    client = Client("http://rewind.test", transport=httpx.MockTransport(script), retry=RetryPolicy(max_wait=30))
    with pytest.raises(RateLimited) as caught:
        client.get_session(SID)
    assert caught.value.retry_after == 57.0 and waits == [] and len(script.requests) == 1


def test_a_server_in_maintenance_says_when_to_come_back(monkeypatch):
    # A 503 whose Retry-After is beyond max_wait is raised at once, as a 429's is, but its ServerError
    # had no `retry_after` (AttributeError): the engine could not tell when to try again.
    waits: list[float] = []
    monkeypatch.setattr("session_rewind_client.client.time.sleep", waits.append)
    script = Script(httpx.Response(503, text="<h1>Down for maintenance</h1>", headers={"Retry-After": "300"}))
    client = Client("http://rewind.test", transport=httpx.MockTransport(script), retry=RetryPolicy(max_wait=30))
    with pytest.raises(ServerError) as caught:
        client.record(SID, {"n": 1})
    assert caught.value.retry_after == 300.0 and caught.value.status == 503 and waits == []
    assert pickle.loads(pickle.dumps(caught.value)).retry_after == 300.0
    script = Script(problem(404, "session_not_found"))
    with sync_client(script) as client, pytest.raises(NotFound) as missing:
        client.get_session(SID)
    assert missing.value.retry_after is None


def test_a_rate_limit_is_waited_out_past_max_retries_until_the_deadline():
    """A 429 is a server asking for less, not an outage: engines sharing a key under a steady limit
    gave up after max_retries (~22 s), well within their deadline, where README says they wait it out."""
    script = Script(*[httpx.Response(429, json={"code": "throttled", "detail": "slow"}, headers={"Retry-After": "0"})] * 8,
                    httpx.Response(200, json={"id": "s"}))
    with sync_client(script) as client:
        assert client.get_session(SID) == {"id": "s"}
    assert len(script.requests) == 9  # FAST allows 3 retries: a 503 would have been raised at the fourth answer

    def always_throttled(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json={"code": "throttled", "detail": "slow"}, headers={"Retry-After": "0"})

    client = Client("http://rewind.test", transport=httpx.MockTransport(always_throttled), retry=FAST, deadline=0.3)
    started = time.monotonic()
    with client, pytest.raises(RateLimited) as caught:
        client.get_session(SID)
    assert caught.value.status == 429 and caught.value.retry_after == 0.0
    assert 0.15 <= time.monotonic() - started <= 1.5  # until the deadline: not at once, not past it


def test_an_outage_is_retried_max_retries_times_only():
    script = Script(*[httpx.Response(503, text="busy")] * 4)
    with sync_client(script) as client, pytest.raises(ServerError):
        client.get_session(SID)
    assert len(script.requests) == 4


def test_lost_connection_is_retried_then_reported():
    script = Script(httpx.ConnectError("refused"), httpx.Response(200, json={"ok": True}))
    with sync_client(script) as client:
        assert client.get_session(SID) == {"ok": True}
    script = Script(*[httpx.ConnectError("refused")] * 4)
    with sync_client(script) as client, pytest.raises(TransportError) as caught:
        client.get_session(SID)
    assert caught.value.status is None and isinstance(caught.value, SessionRewindError)


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [(400, "invalid_state", ValidationError), (404, "session_not_found", NotFound), (409, "version_conflict", ConflictError),
     (412, "precondition_failed", PreconditionFailed), (500, "server_error", ServerError)],
)
def test_errors_are_typed_with_status_code_and_detail(status, code, error):
    script = Script(problem(status, code, details={"head": 5}))
    with sync_client(script) as client, pytest.raises(error) as caught:
        client.get_session(SID)
    assert (caught.value.status, caught.value.code, caught.value.detail) == (status, code, f"{code} happened")
    assert caught.value.details == {"head": 5}
    assert len(script.requests) == 1  # only 429 and 503 are retried


def test_async_client_retries_with_the_same_key():
    script = Script(problem(503, "unavailable"), httpx.Response(201, json={"number": 2}))

    async def main() -> dict:
        async with AsyncClient("http://rewind.test", transport=httpx.MockTransport(script), retry=FAST) as client:
            return await client.rewind(SID, 1, reason="bad step")

    assert asyncio.run(main()) == {"number": 2}
    assert script.requests[0].headers["Idempotency-Key"] == script.requests[1].headers["Idempotency-Key"]


def test_iterators_follow_cursors():
    script = Script(
        httpx.Response(200, json={"results": [{"number": 3}, {"number": 2}], "next": "abc="}),
        httpx.Response(200, json={"results": [{"number": 1}], "next": None}),
    )
    with sync_client(script) as client:
        assert [v["number"] for v in client.iter_versions(SID, limit=2)] == [3, 2, 1]
    assert script.requests[1].url.params["cursor"] == "abc=" and script.requests[1].url.params["limit"] == "2"


def test_a_retried_delete_that_finds_nothing_succeeded_earlier():
    script = Script(httpx.ReadTimeout("answer lost"), problem(404, "session_not_found"))
    with sync_client(script) as client:
        assert client.delete_session(SID, reason="done") is None
    script = Script(problem(404, "session_not_found"))
    with sync_client(script) as client, pytest.raises(NotFound):
        client.delete_session(SID, reason="done")


@pytest.mark.parametrize("state", [{"x": float("nan")}, {"x": float("inf")}, {"x": "\ud800"}, {"x": object()}])
def test_a_value_json_cannot_carry_is_a_validation_error_and_nothing_is_sent(state):
    script = Script()
    with sync_client(script) as client, pytest.raises(ValidationError, match="cannot be sent as JSON"):
        client.record(SID, state)
    assert script.requests == []


@pytest.mark.parametrize(("state", "where"), [
    ({"log": [{"at": 1}, {"at": datetime.now(UTC)}]}, "(a datetime at /state/log/1/at)"),
    ({"seen": {"a/b": {1, 2}}}, "(a set at /state/seen/a~1b)"),
    ({"price": Decimal("9.99")}, "(a Decimal at /state/price)"),
    ({"blob": b"\x00"}, "(a bytes at /state/blob)"),
    ({"scores": [1.0, float("nan")]}, "(a float at /state/scores/1)"),
    ({"by_pair": {(1, 2): "x"}}, "(a key (1, 2) at /state/by_pair)"),
])
def test_a_value_json_cannot_carry_is_named_with_its_path(state, where):
    # In a state of thousands of values the engine was told only "Object of type datetime is not JSON
    # serializable", never which one.
    script = Script()
    with sync_client(script) as client, pytest.raises(ValidationError) as caught:
        client.record(SID, state)
    assert str(caught.value).endswith(where)
    assert script.requests == []


@pytest.mark.parametrize(("state", "said"), [
    ({"by_id": {1: "first", "1": "second"}}, 'the keys 1 and \'1\' would both be sent as "1" (at /state/by_id)'),
    ({"flags": [{True: "on", "true": "also on"}]}, 'the keys True and \'true\' would both be sent as "true" (at /state/flags/0)'),
    ({None: 1, "null": 2}, "the keys None and 'null' would both be sent as \"null\" (at /state)"),
])
def test_keys_json_would_spell_alike_are_a_validation_error_and_nothing_is_sent(state, said):
    """json.dumps turns 1 into "1": sent as it was, the object named "1" twice and the server kept the
    last, so one of the two values was lost without a word."""
    script = Script()
    with sync_client(script) as client, pytest.raises(ValidationError) as caught:
        client.record(SID, state)
    assert said in str(caught.value)
    assert script.requests == []


def test_keys_of_several_types_that_stay_apart_are_sent_as_json_names():
    script = Script(httpx.Response(201, json={"number": 1}))
    with sync_client(script) as client:
        client.record(SID, {"by_id": {1: "one", "2": "two", None: "none", 1.5: "half"}})
    assert json.loads(script.requests[0].content)["state"] == {"by_id": {"1": "one", "2": "two", "null": "none",
                                                                         "1.5": "half"}}


def test_a_state_nested_too_deep_to_encode_is_a_validation_error():
    # It escaped as a bare RecursionError, past the engine's `except SessionRewindError`.
    state: dict = {}
    inner = state
    for _ in range(5000):
        inner["x"] = {}
        inner = inner["x"]
    script = Script()
    with sync_client(script) as client, pytest.raises(ValidationError, match="nests deeper"):
        client.record(SID, state)
    assert script.requests == []


def test_bodies_are_sent_as_json():
    script = Script(httpx.Response(201, json={"number": 1}))
    with sync_client(script) as client:
        client.record(SID, {"x": "é", "n": 1})
    request = script.requests[0]
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {"state": {"x": "é", "n": 1}}


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "localhost:8000", "ftp://rewind.test"])
def test_a_url_without_http_is_refused_when_the_client_is_made(url):
    # It used to fail each request only after the retries meant for an outage (~16 s by default).
    for make in (Client, AsyncClient):
        with pytest.raises(ValueError, match="must start with http:// or https://"):
            make(url, api_key="sr_test")


def test_a_key_read_with_its_line_end_authenticates_and_a_mangled_one_is_refused_unshown():
    script = Script(httpx.Response(200, json={"id": "s"}))
    with Client("http://rewind.test", api_key="sr_test\n", transport=httpx.MockTransport(script), retry=FAST) as client:
        assert client.get_session(SID) == {"id": "s"}
    assert script.requests[0].headers["Authorization"] == "Bearer sr_test"
    for key in ("sr_té", "sr_te st"):
        with pytest.raises(ValueError, match="API key") as caught:
            Client("http://rewind.test", api_key=key)
        assert key not in str(caught.value)


def test_a_request_httpx_cannot_send_is_not_retried():
    script = Script(*[httpx.LocalProtocolError("Illegal header value")] * 4)
    with sync_client(script) as client, pytest.raises(TransportError):
        client.get_session(SID)
    assert len(script.requests) == 1


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_an_error_naming_where_not_an_empty_answer(status):
    # Behind a proxy that sends http:// on to https://, or for a path without its slash, every call
    # used to answer None (a write looked done, nothing was written) or fail decoding the empty body.
    location = f"https://rewind.test/api/v1/sessions/{SID}/versions/"
    script = Script(httpx.Response(status, headers={"Location": location}))
    with sync_client(script) as client, pytest.raises(SessionRewindError) as caught:
        client.record(SID, {"x": 1})
    assert caught.value.status == status and caught.value.code == "redirected"
    assert location in str(caught.value) and "nothing was done" in str(caught.value)
    assert len(script.requests) == 1


def test_a_head_that_has_not_moved_is_still_none():
    script = Script(httpx.Response(304))
    with sync_client(script) as client:
        assert client.head(SID, if_none_match='"c-3"') is None


@pytest.mark.parametrize("answer", [httpx.Response(200, html="<html>Sign in to the proxy</html>"),
                                    httpx.Response(201, json=["not", "a", "session"])])
def test_an_answer_that_is_not_the_apis_json_is_a_session_rewind_error(answer):
    # A captive portal or another site answering 200 escaped as a bare JSONDecodeError (or TypeError),
    # past an engine's `except SessionRewindError`.
    script = Script(answer)
    with sync_client(script) as client, pytest.raises(SessionRewindError) as caught:
        client.create_session("run-1")
    assert caught.value.code == "invalid_response" and caught.value.status == answer.status_code
    assert "not the Session Rewind API's JSON" in str(caught.value)


@pytest.mark.parametrize("answer", [httpx.Response(404, html="<html><h1>Not Found</h1></html>"),
                                    httpx.Response(404, json={"message": "no route"}),
                                    httpx.Response(401, html="<html>Proxy sign-in required</html>")])
def test_an_error_page_that_is_not_the_apis_is_not_taken_for_its_answer(answer):
    """A wrong base URL's 404 page was raised as NotFound, as if the session were gone: an engine that
    recreates a missing session would have done so."""
    script = Script(answer)
    with sync_client(script) as client, pytest.raises(SessionRewindError) as caught:
        client.get_session(SID)
    assert type(caught.value) is SessionRewindError and caught.value.code == "invalid_response"
    assert caught.value.status == answer.status_code and "is the client's URL the API's?" in str(caught.value)
    assert len(script.requests) == 1


def test_an_async_answer_that_is_not_json_is_a_session_rewind_error():
    script = Script(httpx.Response(200, html="<html>Sign in to the proxy</html>"))

    async def main() -> None:
        async with AsyncClient("http://rewind.test", api_key="sr_test", transport=httpx.MockTransport(script),
                               retry=FAST) as client:
            with pytest.raises(SessionRewindError, match="is the client's URL the API's"):
                await client.list_sessions()

    asyncio.run(main())


def test_an_answer_its_content_encoding_cannot_decode_is_a_session_rewind_error():
    # httpx's DecodingError went past an engine's `except SessionRewindError`, the one failure that did.
    def mislabelled(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, content=b'{"number": 1}', headers={"Content-Encoding": "gzip"})

    with Client("http://rewind.test", transport=httpx.MockTransport(mislabelled), retry=FAST) as client, \
            pytest.raises(SessionRewindError, match="could not be decoded") as caught:
        client.record(SID, {"n": 1})
    assert caught.value.code == "invalid_response"

    async def main() -> None:
        async with AsyncClient("http://rewind.test", transport=httpx.MockTransport(mislabelled), retry=FAST) as client:
            with pytest.raises(SessionRewindError, match="could not be decoded"):
                await client.record(SID, {"n": 1})

    asyncio.run(main())


@pytest.mark.parametrize(("status", "code"), [(409, "version_conflict"), (429, "throttled"), (503, "database_unavailable")])
def test_an_error_survives_pickling_as_it_was(status, code):
    # A process pool or a task queue hands errors on pickled: they came back with their message
    # garbled ("- throttled: 429 throttled: …") and the message as their detail.
    script = Script(*[problem(status, code, details={"head": 4})] * 1000)  # a 429 is retried until the deadline
    with sync_client(script, deadline=0.1) as client, pytest.raises(SessionRewindError) as caught:
        client.record(SID, {"x": 1})
    error = caught.value
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert (str(copy), copy.status, copy.code, copy.detail, copy.details) == (str(error), status, code, error.detail,
                                                                              {"head": 4})
    assert getattr(copy, "retry_after", None) == getattr(error, "retry_after", None)


def test_a_server_that_cannot_be_reached_is_named():
    # Without a URL (nor SESSION_REWIND_URL) the client talks to 127.0.0.1:8000; the error said only
    # "POST sessions/ failed: ConnectError('refused')", never which server was tried.
    script = Script(*[httpx.ConnectError("refused")] * 4)
    with sync_client(script) as client, pytest.raises(TransportError) as caught:
        client.create_session("run-1")
    assert "POST http://rewind.test/api/v1/sessions/ failed (4 attempts" in str(caught.value)


@pytest.mark.parametrize("make", [lambda **kw: Client(http=httpx.Client(), **kw),
                                  lambda **kw: AsyncClient(http=httpx.AsyncClient(), **kw)])
@pytest.mark.parametrize("given", [{"api_key": "sr_test"}, {"base_url": "http://rewind.test"}])
def test_what_http_makes_unused_is_refused_not_ignored(make, given):
    # The key given beside http= was never sent: every call failed 401 not_authenticated.
    with pytest.raises(ValueError, match=f"{next(iter(given))} would be ignored beside http="):
        make(**given)


@pytest.mark.parametrize("session_id", [f"{SID}/versions", "..", "not-a-session", ""])
def test_a_session_id_that_is_not_one_is_refused_before_anything_is_sent(session_id):
    """Quoted, a `/` in an id still reached the server as one (it decodes `%2F` before routing): an id
    taken from input could call another endpoint (`get_session(sid + "/versions")` listed versions)."""
    script = Script()
    with sync_client(script) as client, pytest.raises(NotFound) as caught:
        client.get_session(session_id)
    assert script.requests == [] and caught.value.code == "session_not_found"
    assert str(caught.value) == f"session_not_found: no session {session_id!r}: session ids are UUIDs"
    with sync_client(Script(httpx.Response(200, json={"id": SID}))) as client:
        assert client.get_session(uuid.UUID(SID)) == {"id": SID}


def test_an_async_clients_refusal_of_a_session_id_comes_when_the_call_is_awaited():
    """It was raised as the coroutine was made: asyncio.gather(*(client.get_session(i) for i in ids))
    raised before gathering anything."""

    async def main() -> None:
        script = Script()
        async with AsyncClient("http://rewind.test", transport=httpx.MockTransport(script), retry=FAST) as client:
            pending = client.get_session("not-a-session")  # no error yet
            with pytest.raises(NotFound, match="no session 'not-a-session': session ids are UUIDs"):
                await pending
        assert script.requests == []

    asyncio.run(main())
