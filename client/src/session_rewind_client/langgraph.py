"""LangGraph checkpoint saver backed by Session Rewind: threads are sessions, checkpoints are versions.

    saver = SessionRewindSaver(Client("http://127.0.0.1:8000", api_key="sr_..."))
    graph = builder.compile(checkpointer=saver)
    graph.invoke(inputs, {"configurable": {"thread_id": "order-42"}})

Mapping (all visible in the dashboard):

* one session per (thread_id, checkpoint_ns): external id ``<prefix><thread_id>`` for the root
  namespace, ``<prefix><thread_id>|<ns>`` for a subgraph's; every session of a thread carries the tag
  ``lg-thread:<hash>`` so `delete_thread` finds them all;
* one version per checkpoint, state ``{"checkpoint", "metadata", "parent_checkpoint_id"}``, tagged
  ``cp:<checkpoint id>``, step ``<source> <step> → <next nodes>``, engine ``langgraph`` and its version;
* a checkpoint whose parent is not the head (``update_state`` on an older checkpoint, or a replay
  from a checkpoint id) first *rewinds* the session to the parent, so the new checkpoint shows as a
  branch in the timeline;
* pending writes go to a companion session ``<session external id>|writes``, one version per
  `put_writes` call tagged ``cp:<checkpoint id>``, so they never move the thread's head.

The thread's current checkpoint is the session's head: an operator's rewind in the dashboard is what
the next ``invoke(None, config)`` resumes from, and it resumes *before* the tasks that ran after that
checkpoint: writes made before a rewind belong to the checkpoint's original version, not to the
rewind (by the server's timestamps), so those tasks run again, and a subgraph among them starts afresh
(its checkpoints from before the rewind are not loaded, as on LangGraph's own replay). A subgraph that
keeps its memory across runs (compiled with ``checkpointer=True``) gets it back as it was at that
checkpoint, then and on every later run: a subgraph namespace's latest checkpoint is its newest one
made while the root thread was on its current branch (see `_as_of_root`). Channel values that are plain JSON are stored as JSON
(diffable in the dashboard), chat messages in LangChain's JSON form (``{"__lc_message__": ...}``,
loaded back with only message classes allowed); anything else goes through the saver's serde
(``{"__lg_serde__": [type, base64]}``), a subclass of str, int or float (an Enum's member) included.
They come back as they went, a dict's key order included: the server sorts an object's keys, so a
dict of channel values whose keys were in another order records its own (``"__lg_keys__"``, see
`_as_readable_json`).

Every method exists sync and async; both run the same code (`_Ops`), written once as generators
that yield API calls, so the async path never blocks the event loop.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import json
import math
import re
import threading
import warnings
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from itertools import pairwise
from typing import Any
from urllib.parse import unquote

try:
    from langchain_core.load import dumpd, load
    from langchain_core.messages import BaseMessage
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.base import (
        WRITES_IDX_MAP,
        BaseCheckpointSaver,
        ChannelVersions,
        Checkpoint,
        CheckpointMetadata,
        CheckpointTuple,
        get_checkpoint_id,
        get_checkpoint_metadata,
    )
    from langgraph.checkpoint.serde.base import SerializerProtocol
except ImportError as exc:  # installed without the extra: say which to install
    raise ImportError("session_rewind_client.langgraph needs LangGraph: "
                      f"pip install './client[langgraph]' from a Session Rewind checkout, or "
                      f"'session-rewind-client[langgraph]' from your own package index ({exc})") from exc

from session_rewind_client._core import Call
from session_rewind_client.client import AsyncClient, Client
from session_rewind_client.errors import ConflictError, NotFound, SessionRewindError, ValidationError

ENGINE = "langgraph"
SERDE_KEY = "__lg_serde__"
MESSAGE_KEY = "__lc_message__"
# Beside the keys of a dict whose keys are not in the order the server keeps them in: its own (`_as_readable_json`).
ORDER_KEY = "__lg_keys__"
MARKER_KEYS = frozenset({SERDE_KEY, MESSAGE_KEY, ORDER_KEY})
TAG_RE = re.compile(r"^[\w.:\-/ ]{1,64}$")
MAX_INT = 2**63 - 1
WRITES_SUFFIX = "|writes"
KEEP_ALL_TAG = "retention:keep-all"  # sessions so tagged keep every version whatever the project's policy
EXTERNAL_ID_MAX = 255
PAGE = 200
STATES_PAGE = 50  # the most versions the server answers with their states in one page
STATES_PAGE_BYTES = 8 * 1024 * 1024  # a page of states ends early past this
BATCH_MAX = 500  # the most snapshots the server records in one batch
BATCH_BYTES = 4 * 1024 * 1024  # a batch of states ends before this (the server takes 17 MiB bodies by default)
# A listing reads the pending writes of its first checkpoints one request each; a caller reading on
# makes it weigh that against one pass over the whole writes session (see `_PendingWrites`).
WRITES_PROBE = 2
# Versions that put a checkpoint back as an operator made it: a rewind, or a data fix (its corrected
# state, the same checkpoint id). The writes made before one belong to the run it replaced.
RESTARTS = ("rewind", "data_fix")

Op = Generator[Any, Any, Any]
# `SessionRewindSaver.list` shadows the builtin inside the class, hence `builtins.list` there.
Rows = list[dict[str, Any]]


def _engine_version() -> str:
    for dist in ("langgraph", "langgraph-checkpoint"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def thread_tag(thread_id: str) -> str:
    return f"lg-thread:{_hash(thread_id)[:24]}"


def checkpoint_tag(checkpoint_id: str) -> str:
    tag = f"cp:{checkpoint_id}"
    return tag if TAG_RE.match(tag) else f"cp:#{_hash(checkpoint_id)[:40]}"


_UNREADABLE = object()


def _as_readable_json(value: Any, depth: int = 0, *, ordered: bool = True) -> Any:
    """`value` as JSON that reads back equal, with chat messages in LangChain's own JSON form (so a
    conversation stays readable and diffable in the dashboard); `_UNREADABLE` when it is not.

    `ordered`: it reads back with its dicts' keys in the order they had. The server keeps a state as
    canonical JSON, every object's keys sorted by code point (Python's own order for `str`, as the
    client sorts them too), so a dict whose keys are not in that order also holds `ORDER_KEY`, its
    keys as they came: ``{"__lg_keys__": ["search", "book"], "book": ..., "search": ...}``. Its values
    stay where they were, readable and diffed by their own paths in the dashboard (`/plan/book`),
    rather than the whole dict going through the serde as an opaque blob: dicts an engine builds are
    seldom in sorted order (a plan, a tool call's arguments), and most of a state would have gone
    dark. In a chat message, the values of its constructor's keyword arguments (its tool calls'
    arguments, its metadata) are so kept; the envelope and the keywords themselves need no order.
    Without `ordered` (the checkpoint's bookkeeping, its metadata: LangGraph needs no order there,
    and its own PostgreSQL saver keeps none) dicts come back with their keys sorted."""
    if depth > 60:
        return _UNREADABLE
    if _is_plain_json(value, depth, in_order=ordered):
        return value
    if isinstance(value, BaseMessage):
        dumped = dumpd(value)
        kwargs = dumped.get("kwargs")
        if dumped.get("type") != "constructor" or not _is_plain_json(dumped) or type(kwargs) is not dict:
            return _UNREADABLE
        if ordered:  # plain JSON: always readable
            dumped = {**dumped, "kwargs": {key: _as_readable_json(item) for key, item in kwargs.items()}}
        return {MESSAGE_KEY: dumped}
    if type(value) is list:
        items = [_as_readable_json(item, depth + 1, ordered=ordered) for item in value]
        return _UNREADABLE if any(item is _UNREADABLE for item in items) else items
    if type(value) is dict and all(type(key) is str for key in value) and not (value.keys() & MARKER_KEYS):
        encoded = {key: _as_readable_json(item, depth + 1, ordered=ordered) for key, item in value.items()}
        if any(item is _UNREADABLE for item in encoded.values()):
            return _UNREADABLE
        return encoded if not ordered or _in_canonical_order(value) else {ORDER_KEY: list(value), **encoded}
    return _UNREADABLE


def _in_canonical_order(value: dict[str, Any]) -> bool:
    """True when the dict's keys are in the order the server keeps them in (sorted by code point)."""
    return all(before < after for before, after in pairwise(value))


def _key_order(value: dict[str, Any]) -> list[str] | None:
    """The key order a stored dict records (`ORDER_KEY`), or None when it records none."""
    order = value.get(ORDER_KEY)
    return order if type(order) is list and all(type(key) is str for key in order) else None


def _in_order(items: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """`items` with the keys `order` lists first, in that order, then any others as they are: an
    operator's data fix may add a key and not list it, or drop one and leave it listed."""
    ordered = {key: items.pop(key) for key in order if key in items}
    ordered.update(items)
    return ordered


def _restore_order(value: Any) -> Any:
    """Stored JSON with each dict's recorded key order put back (and nothing else decoded)."""
    if type(value) is dict:
        order = _key_order(value)
        items = {key: _restore_order(item) for key, item in value.items() if order is None or key != ORDER_KEY}
        return items if order is None else _in_order(items, order)
    if type(value) is list:
        return [_restore_order(item) for item in value]
    return value


def _load_message(dumped: dict[str, Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load() is marked beta; only chat message classes are allowed
        return load(dumped, allowed_objects="messages")


_PLAIN_SCALARS = (type(None), bool, str)


def _is_plain_json(value: Any, depth: int = 0, *, in_order: bool = False) -> bool:
    """True when JSON round-trips `value` exactly (so it can be stored readable and diffable); with
    `in_order`, its dicts' key order too (each dict's keys already in the server's order).

    Exact types only: JSON gives back a `str`, an `int` or a `float`, never a subclass of one, so a
    ``class Status(str, Enum)`` member, an `IntEnum`'s (or a str-keyed dict whose keys are such) is
    not plain (it goes through the serde and comes back the member it was; stored as JSON it came
    back a plain str or int, and ``status is Status.PENDING`` took another branch after a resume)."""
    if depth > 60:
        return False
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return True
    if kind is int:
        return -MAX_INT <= value <= MAX_INT
    if kind is float:
        return math.isfinite(value)
    if kind is list:
        return all(_is_plain_json(item, depth + 1, in_order=in_order) for item in value)
    if kind is dict:
        return not (value.keys() & MARKER_KEYS) and all(
            type(key) is str and _is_plain_json(item, depth + 1, in_order=in_order) for key, item in value.items()
        ) and (not in_order or _in_canonical_order(value))
    return False


def _when(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def _fit(external_id: str) -> str:
    """External ids hold 255 characters: longer ones keep a readable start and a hash of the rest."""
    if len(external_id) <= EXTERNAL_ID_MAX:
        return external_id
    return f"{external_id[:EXTERNAL_ID_MAX - 41]}#{_hash(external_id)[:40]}"


def _writes_of(external_id: str) -> str:
    return _fit(external_id + WRITES_SUFFIX)


def _escape(thread_id: str) -> str:
    """A thread id as its sessions' external ids hold it. A bar there ends the thread id (a namespace
    or the writes session follows), so the id's own bars, and the escape's percent signs, are
    percent-encoded: thread "a|writes" is not thread "a"'s writes session. So is a NUL, which no
    external id may hold (LangGraph takes any string). Other ids are unchanged."""
    return thread_id.replace("%", "%25").replace("|", "%7C").replace("\x00", "%00")


def _noted_thread(thread_id: str) -> dict[str, Any]:
    """The thread id as a session's metadata notes it: as it is, unless it holds a NUL, which metadata
    cannot hold either; then escaped, and said so (`_thread_noted` reads it back)."""
    if "\x00" in thread_id:
        return {"thread_id": _escape(thread_id), "thread_id_escaped": True}
    return {"thread_id": thread_id}


def _thread_noted(meta: dict[str, Any]) -> str | None:
    """The thread id a session's metadata["langgraph"] notes (see `_noted_thread`), or None."""
    if "thread_id" not in meta:
        return None
    noted = str(meta["thread_id"])
    return _unescape(noted) if meta.get("thread_id_escaped") else noted


def _unescape(text: str) -> str | None:
    """The thread id `_escape` made `text` of, or None when it made no such text."""
    thread_id = unquote(text)
    return thread_id if _escape(thread_id) == text else None


TASKS = "__pregel_tasks"  # the channel of a checkpoint's queued Sends (langgraph._internal._constants.TASKS)


def step_name(checkpoint: Checkpoint, metadata: CheckpointMetadata) -> str:
    """The execution pointer shown in the timeline: ``loop 1 → book, worker x3`` (superstep, then the
    nodes this checkpoint hands over to): from the `branch:to:<node>` channels it updated, the
    `Send`s it queued, and the `join:<a+b>:<node>` barriers it completed."""
    name = f"{metadata.get('source', 'checkpoint')} {metadata.get('step', '')}".strip()
    values = checkpoint.get("channel_values") or {}
    following: Counter[str] = Counter()
    for channel in checkpoint.get("updated_channels") or []:
        if channel.startswith("branch:to:"):
            following[channel.removeprefix("branch:to:")] += 1
        elif channel == TASKS:
            following.update(str(getattr(send, "node", "?")) for send in values.get(TASKS) or [])
        elif channel.startswith("join:") and channel.count(":") >= 2:
            _, starts, node = channel.split(":", 2)
            seen = values.get(channel)
            if isinstance(seen, (set, frozenset, list)) and set(starts.split("+")) <= set(seen):
                following[node] += 1
    shown = ", ".join(node if count == 1 else f"{node} x{count}" for node, count in sorted(following.items()))
    return (f"{name} → {shown}" if shown else name)[:200]


def _within(write_versions: list[dict[str, Any]], window: tuple[datetime | None, datetime | None]) -> list[dict[str, Any]]:
    """The write versions the server stored inside [start, end)."""
    start, end = window
    return [
        meta for meta in write_versions
        if (start is None or _when(meta["created_at"]) >= start) and (end is None or _when(meta["created_at"]) < end)
    ]


def _rewind_targets(rewind_versions: list[dict[str, Any]]) -> dict[int, tuple[int, datetime]]:
    """Rewind number -> (the non-rewind version it restores, when), following rewinds of rewinds."""
    parents = {int(meta["number"]): meta.get("parent") for meta in rewind_versions}
    targets: dict[int, tuple[int, datetime]] = {}
    for meta in rewind_versions:
        target = meta.get("parent")
        while target in parents:
            target = parents[target]
        if target is not None:
            targets[int(meta["number"])] = (int(target), _when(meta["created_at"]))
    return targets


def _langgraph_meta(session: dict[str, Any]) -> dict[str, Any]:
    """What this saver noted on a session it made (metadata["langgraph"]: thread, namespace, writes or not)."""
    return (session.get("metadata") or {}).get("langgraph") or {}


class _Lineage:
    """When the root thread's current branch was its head, as spans of server time, newest first: a
    version another session of the thread made inside one was made on that branch, one made between
    them on a branch a rewind left. `resumes` while the root's head is a rewind: (when it was made,
    when the version it restores was made, that version's checkpoint id)."""

    def __init__(self, spans: builtins.list[tuple[datetime | None, datetime | None]],
                 resumes: tuple[datetime, datetime, str] | None) -> None:
        self.spans = spans
        self.resumes = resumes

    def live(self, when: datetime) -> bool:
        return any((after is None or when > after) and (before is None or when < before) for after, before in self.spans)


class _VersionPages:
    """A session's versions, newest first (or in `filters`' ordering), one page per `next_page` call:
    a listing fetches the next page only when its caller reads past the last one. With their verified
    states (`with_state`, pages of STATES_PAGE), or their metadata alone (pages of PAGE)."""

    def __init__(self, session_id: str, filters: dict[str, str] | None = None, *, with_state: bool = True,
                 first: int | None = None) -> None:
        self.path = f"sessions/{session_id}/versions/"
        self.filters = {**(filters or {}), **({"with_state": "true"} if with_state else {})}
        self.full = STATES_PAGE if with_state else PAGE
        self.size = self.full if first is None else max(1, min(first, self.full))
        self.cursor: str | None = None
        self.done = False

    def next_page(self) -> Op:
        """The next page's versions ([] at the end, or once the session is gone)."""
        if self.done:
            return []
        params: dict[str, Any] = {**self.filters, "limit": self.size}
        if self.cursor:
            params["cursor"] = self.cursor
        try:
            page = yield Call("GET", self.path, params=params)
        except NotFound:
            self.done = True
            return []
        self.cursor = page.get("next")
        self.done = not self.cursor
        self.size = self.full
        tag = self.filters.get("tag")  # exact here whatever the server's tag lookup
        return [row for row in page.get("results") or [] if tag is None or tag in (row.get("tags") or [])]

    def all(self) -> Op:
        rows: Rows = []
        while not self.done:
            rows.extend((yield from self.next_page()))
        return rows


class _RewindEnds:
    """For a walk over a session's versions newest first: when each version was first rewound to.

    A rewind restores its parent (itself maybe a rewind, restoring its own): every rewind that leads
    to a version is newer than it, so by the time the walk reaches a version it has seen them all."""

    def __init__(self) -> None:
        self._first: dict[int, datetime] = {}  # version number -> the earliest rewind leading to it so far

    def saw(self, meta: dict[str, Any]) -> datetime | None:
        """Note `meta` (rewind or not); answers, for a version that is no rewind, when it was first rewound to."""
        number = int(meta["number"])
        first = self._first.pop(number, None)
        if meta.get("kind") != "rewind":
            return first
        when = _when(meta["created_at"]) if first is None else min(first, _when(meta["created_at"]))
        parent = meta.get("parent")
        if parent is not None:
            known = self._first.get(int(parent))
            self._first[int(parent)] = when if known is None else min(known, when)
        return None


class _PendingWrites:
    """The pending writes of the checkpoints a listing hands out, read from the companion writes session.

    One request per checkpoint (its tag, with states) is cheapest for a caller that reads a few; one
    pass over the whole writes session (pages of states) for one that reads the whole history. Which
    one a caller is shows only as it reads on, so: the first `WRITES_PROBE` checkpoints one request
    each; then, learning what the pass costs (one request for the session's size), one request each
    until they add up to that cost, and the pass after (never much more than twice the better of the
    two). A `limit` that leaves fewer checkpoints than the pass costs keeps to one request each."""

    def __init__(self, session_id: str, limit: int | None, collect: Callable[[str, Rows], Op]) -> None:
        self.session_id = session_id
        self.limit = limit
        self.collect = collect
        self.asked = 0  # checkpoints whose writes were read one request each
        self.pass_cost: int | None = None
        self.by_tag: dict[str, Rows] | None = None  # checkpoint tag -> write versions, once read in one pass

    def of(self, checkpoint_id: str, end: datetime | None, emitted: int, start: datetime | None = None) -> Op:
        """The writes of this checkpoint made from `start` (a data fix: when it was made) to `end` (its
        first rewind), `emitted` checkpoints having been handed out before it."""
        tag = checkpoint_tag(checkpoint_id)
        left = None if self.limit is None else self.limit - emitted
        if self.by_tag is None and self.asked >= WRITES_PROBE and (left is None or left > 1):
            if self.pass_cost is None:
                self.pass_cost = yield from self._pass_cost()
            if self.asked >= self.pass_cost and (left is None or left > self.pass_cost):
                self.by_tag = {}
                for meta in (yield from _VersionPages(self.session_id).all()):
                    for found in meta.get("tags") or []:
                        if found.startswith("cp:"):
                            self.by_tag.setdefault(found, []).append(meta)
        if self.by_tag is not None:
            rows = self.by_tag.get(tag, [])
        else:
            rows = yield from _VersionPages(self.session_id, {"tag": tag}).all()
            self.asked += 1
        return (yield from self.collect(self.session_id, _within(rows, (start, end))))

    def _pass_cost(self) -> Op:
        """Requests one pass over the writes session takes: its pages of states."""
        try:
            session = yield Call("GET", f"sessions/{self.session_id}/")
        except NotFound:
            return 1
        count = int(session.get("version_count") or 0)
        size = int(session.get("logical_bytes") or 0)
        return max(1, math.ceil(count / STATES_PAGE), math.ceil(size / STATES_PAGE_BYTES))


class _Item:
    """Wraps a value an operation hands to its caller (as opposed to a `Call` it wants run)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _counting(op: Op, counter: builtins.list[int]) -> Op:
    """Runs `op` as part of the calling operation, counting the items it hands out."""
    to_send: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = op.throw(error) if error is not None else op.send(to_send)
        except StopIteration as stop:
            return stop.value
        to_send, error = None, None
        if isinstance(step, _Item):
            counter[0] += 1
        try:
            to_send = yield step
        except SessionRewindError as exc:
            error = exc


class _LRU:
    """A dict of at most `size` entries that forgets the least recently used first (thread-safe)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def pop(self, key: Any) -> None:
        with self._lock:
            self._data.pop(key, None)

    def drop(self, predicate: Callable[[Any, Any], bool]) -> None:
        """Forget every entry for which `predicate(key, value)` holds."""
        with self._lock:
            for key in [key for key, value in self._data.items() if predicate(key, value)]:
                del self._data[key]

    def __len__(self) -> int:
        return len(self._data)


class SessionRewindSaver(BaseCheckpointSaver[int]):
    """A `BaseCheckpointSaver` storing LangGraph checkpoints in Session Rewind.

    Pass a `Client` for sync graphs (``invoke``/``stream``), an `AsyncClient` for async ones
    (``ainvoke``/``astream``), or both. `delete_thread` and `prune` delete sessions, which needs an
    API key with the ``admin`` scope. `cache_size` bounds the checkpoint states kept in memory,
    `session_cache_size` the sessions (a thread's, its subgraphs' and their writes') whose ids and
    heads are remembered: least recently used first out, so a process serving any number of
    threads stays bounded, and one coming back to a thread forgotten meanwhile asks the server once.
    """

    def __init__(
        self,
        client: Client | None = None,
        *,
        aclient: AsyncClient | None = None,
        prefix: str = "",
        serde: SerializerProtocol | None = None,
        cache_size: int = 512,
        session_cache_size: int = 4096,
    ) -> None:
        super().__init__(serde=serde)
        if client is None and aclient is None:
            raise ValueError("pass a Client (sync graphs), an AsyncClient (async graphs), or both")
        if isinstance(client, AsyncClient) or isinstance(aclient, Client):
            # Else the mistake shows only at the first checkpoint, as an unawaited coroutine or a
            # "no AsyncClient" beside the one given.
            raise TypeError("pass the Client as client= (sync graphs) and the AsyncClient as aclient= (async "
                            "graphs): SessionRewindSaver(aclient=AsyncClient(...))")
        self.client = client
        self.aclient = aclient
        self.prefix = prefix
        self.engine_version = _engine_version()
        # Versions never change, so what was read once can be served again; session ids can
        # disappear (delete/prune), so those entries are dropped there. Every cache is bounded: a
        # long-lived engine process sees an unbounded number of threads. A thread it runs stays among
        # the most recently used, so it costs no extra request; one it comes back to after
        # `session_cache_size` others costs one lookup.
        # external id -> (session id, True once this saver created or claimed the session)
        self._sessions = _LRU(session_cache_size)
        self._states = _LRU(cache_size)
        self._numbers = _LRU(cache_size * 4)
        # session id -> (head number, its checkpoint id) as this saver last saw or wrote it. Only ids
        # are kept from writes: the values in a written state are still LangGraph's live objects.
        self._heads = _LRU(session_cache_size)
        # (session id, version number) -> (created_at, checkpoint id) of a version the root thread was rewound to
        self._facts = _LRU(cache_size)

    # -- running operations ------------------------------------------------------------------------

    def _sync(self, op: Op) -> Any:
        return next(iter(self._sync_iter(op, wrap_result=True)))

    def _sync_iter(self, op: Op, *, wrap_result: bool = False) -> Iterator[Any]:
        if self.client is None:
            raise RuntimeError("this saver has no sync Client; use the async methods or pass client=")
        run = self.client._run
        to_send: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = op.throw(error) if error is not None else op.send(to_send)
            except StopIteration as stop:
                if wrap_result:
                    yield stop.value
                return
            to_send, error = None, None
            if isinstance(step, _Item):
                yield step.value
                continue
            try:
                to_send = run(step)
            except SessionRewindError as exc:
                error = exc

    async def _async(self, op: Op) -> Any:
        async for value in self._async_iter(op, wrap_result=True):
            return value
        return None  # pragma: no cover - an operation always ends

    async def _async_iter(self, op: Op, *, wrap_result: bool = False) -> AsyncIterator[Any]:
        if self.aclient is None:
            raise RuntimeError("this saver has no AsyncClient; use the sync methods or pass aclient=")
        run = self.aclient._run
        to_send: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = op.throw(error) if error is not None else op.send(to_send)
            except StopIteration as stop:
                if wrap_result:
                    yield stop.value
                return
            to_send, error = None, None
            if isinstance(step, _Item):
                yield step.value
                continue
            try:
                to_send = await run(step)
            except SessionRewindError as exc:
                error = exc

    # -- public API: sync --------------------------------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._sync(self._get_tuple(config))

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        yield from self._sync_iter(self._list(config, filter=filter, before=before, limit=limit))

    def put(
        self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata, new_versions: ChannelVersions
    ) -> RunnableConfig:
        return self._sync(self._put(config, checkpoint, metadata))

    def put_writes(
        self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        self._sync(self._put_writes(config, writes, task_id, task_path))

    def delete_thread(self, thread_id: str) -> None:
        self._sync(self._delete_thread(thread_id))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._sync(self._copy_thread(source_thread_id, target_thread_id))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._sync(self._prune(thread_ids, strategy))

    def set_status(self, thread_id: str, status: str) -> None:
        """Set the status of the thread's session (running, waiting, completed, failed, cancelled).
        A checkpointer is not told that a graph finished, or stopped at an interrupt(): the session
        stays `running` until the run says otherwise, e.g. `saver.set_status(thread_id, "completed")`
        once `invoke` returns with nothing left to run, or "waiting" when it returns an interrupt."""
        self._sync(self._set_status(thread_id, status))

    # -- public API: async -------------------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await self._async(self._get_tuple(config))

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        async for item in self._async_iter(self._list(config, filter=filter, before=before, limit=limit)):
            yield item

    async def aput(
        self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata, new_versions: ChannelVersions
    ) -> RunnableConfig:
        return await self._async(self._put(config, checkpoint, metadata))

    async def aput_writes(
        self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        await self._async(self._put_writes(config, writes, task_id, task_path))

    async def adelete_thread(self, thread_id: str) -> None:
        await self._async(self._delete_thread(thread_id))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self._async(self._copy_thread(source_thread_id, target_thread_id))

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        await self._async(self._prune(thread_ids, strategy))

    async def aset_status(self, thread_id: str, status: str) -> None:
        await self._async(self._set_status(thread_id, status))

    def get_next_version(self, current: int | None, channel: None = None) -> int:
        return 1 if current is None else int(current) + 1

    # -- encoding ----------------------------------------------------------------------------------

    def _encode(self, value: Any, *, ordered: bool = True) -> Any:
        """`value` as stored: readable JSON where it can be (see `_as_readable_json`; `ordered`:
        with its dicts' key order, as a channel value or a write needs), else through the serde."""
        readable = _as_readable_json(value, ordered=ordered)
        if readable is not _UNREADABLE:
            return readable
        kind, data = self.serde.dumps_typed(value)
        return {SERDE_KEY: [kind, base64.b64encode(data).decode("ascii")]}

    def _decode(self, value: Any) -> Any:
        if isinstance(value, dict):
            if SERDE_KEY in value:
                kind, data = value[SERDE_KEY]
                return self.serde.loads_typed((kind, base64.b64decode(data)))
            if MESSAGE_KEY in value:
                return _load_message(_restore_order(value[MESSAGE_KEY]))
            order = _key_order(value)
            items = {key: self._decode(item) for key, item in value.items() if order is None or key != ORDER_KEY}
            return items if order is None else _in_order(items, order)
        if isinstance(value, list):
            return [self._decode(item) for item in value]
        return value

    def _state_for(self, checkpoint: Checkpoint, metadata: CheckpointMetadata, parent_id: str | None) -> dict[str, Any]:
        body = {key: value for key, value in checkpoint.items() if key != "channel_values"}
        versions = checkpoint.get("channel_versions") or {}
        values = {
            name: self._encode(value)
            for name, value in checkpoint.get("channel_values", {}).items()
            if not versions or name in versions
        }
        # Channel values keep their dicts' key order (a graph's code sees them); the checkpoint's
        # bookkeeping (channel versions, versions seen) and its metadata need none, and stay as they were.
        return {
            "checkpoint": {**{key: self._encode(value, ordered=False) for key, value in body.items()},
                           "channel_values": values},
            "metadata": {key: self._encode(value, ordered=False) for key, value in metadata.items()},
            "parent_checkpoint_id": parent_id,
        }

    def _tuple_from(self, state: dict[str, Any], thread_id: str, ns: str, writes: builtins.list[Any]) -> CheckpointTuple:
        stored = state["checkpoint"]
        checkpoint: dict[str, Any] = {key: self._decode(value) for key, value in stored.items() if key != "channel_values"}
        checkpoint["channel_values"] = {name: self._decode(value) for name, value in stored["channel_values"].items()}
        parent_id = state.get("parent_checkpoint_id")
        return CheckpointTuple(
            config={"configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": checkpoint["id"]}},
            checkpoint=checkpoint,  # type: ignore[arg-type]
            metadata={key: self._decode(value) for key, value in state["metadata"].items()},  # type: ignore[arg-type]
            parent_config=(
                {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": parent_id}}
                if parent_id else None
            ),
            pending_writes=writes,
        )

    # -- sessions ----------------------------------------------------------------------------------

    def _external_ids(self, thread_id: str, ns: str, *, writes: bool = False) -> tuple[str, ...]:
        """The external id of the thread's session for namespace `ns` (its pending writes' session
        with `writes`), then, for a thread id holding a bar or a percent sign, the one a client
        before `_escape` gave it (its sessions made then are still found there)."""
        names = []
        # (No client before `_escape` could store an id holding a NUL: no older name to look for.)
        for key in dict.fromkeys((_escape(thread_id), thread_id) if "\x00" not in thread_id else (_escape(thread_id),)):
            base = f"{self.prefix}{key}"
            name = _fit(base if not ns else f"{base}|{ns}")
            names.append(_writes_of(name) if writes else name)
        return tuple(names)

    def _external_id(self, thread_id: str, ns: str, *, writes: bool = False) -> str:
        return self._external_ids(thread_id, ns, writes=writes)[0]

    def _find_session(self, thread_id: str, ns: str, *, writes: bool = False) -> Op:
        """The id of the thread's session for `ns` (of its pending writes with `writes`), or None
        (never creates one). One an older client named is the thread's only if its metadata says so:
        that name may be another thread's (see `_escape`)."""
        names = self._external_ids(thread_id, ns, writes=writes)
        cached = self._sessions.get(names[0])
        if cached is not None:
            return cached[0]
        for name in names:
            page = yield Call("GET", "sessions/", params={"external_id": name, "limit": 2})
            for found in page.get("results", []):
                if found.get("external_id") == name and (name == names[0] or self._belongs(found, thread_id)):
                    # An older client's session is as this saver would make it: no need to ensure it.
                    self._sessions.put(names[0], (str(found["id"]), name != names[0]))
                    return str(found["id"])
        return None

    def _ensure_session(self, thread_id: str, ns: str, *, writes: bool = False) -> Op:
        external_id, *older = self._external_ids(thread_id, ns, writes=writes)
        cached = self._sessions.get(external_id)
        if cached is None and older:
            yield from self._find_session(thread_id, ns, writes=writes)  # an older client's session, if any
            cached = self._sessions.get(external_id)
        if cached is not None and cached[1]:
            return cached[0]
        body: dict[str, Any] = {
            "external_id": external_id,
            "workflow": "langgraph",
            "metadata": {"langgraph": {**_noted_thread(thread_id), "checkpoint_ns": ns, "pending_writes": writes}},
            # Retention never thins the writes session: each version holds other writes, and a resumed
            # graph needs its checkpoint's (or it re-runs tasks that had finished).
            "tags": ["langgraph", thread_tag(thread_id)] + (["langgraph-writes", KEEP_ALL_TAG] if writes else []),
        }
        session = yield Call("POST", "sessions/", json=body)
        found = _langgraph_meta(session)
        if found != body["metadata"]["langgraph"] or not set(body["tags"]) <= set(session.get("tags") or []):
            # An existing session made for another thread: a fork made in Session Rewind (it carries
            # its source's tags and metadata). Claim it for this thread, or delete_thread of the
            # source would delete it and this thread's would miss it.
            tags = [tag for tag in session.get("tags") or [] if not tag.startswith("lg-thread:")]
            yield Call("PATCH", f"sessions/{session['id']}/", json={
                "metadata": {**(session.get("metadata") or {}), "langgraph": body["metadata"]["langgraph"]},
                "tags": list(dict.fromkeys(tags + body["tags"])),
            })
        self._sessions.put(external_id, (str(session["id"]), True))
        return str(session["id"])

    def _forget(self, session_id: str) -> None:
        self._sessions.drop(lambda key, value: value[0] == session_id)
        self._states.drop(lambda key, value: key[0] == session_id)
        self._numbers.drop(lambda key, value: key[0] == session_id)
        self._heads.pop(session_id)
        self._facts.drop(lambda key, value: key[0] == session_id)

    def _state(self, session_id: str, number: int) -> Op:
        cached = self._states.get((session_id, number))
        if cached is not None:
            return cached
        found = yield Call("GET", f"sessions/{session_id}/versions/{number}/")
        self._states.put((session_id, number), found["state"])
        return found["state"]

    def _checkpoint_version(self, session_id: str, checkpoint_id: str) -> Op:
        """(number, state) of the newest version holding this checkpoint, or None: from the caches, else
        in one request, the newest version tagged with it with its state (a page of one; the pages
        after it only when the server's tag match was not exact, as on SQLite)."""
        number = self._numbers.get((session_id, checkpoint_id))
        if number is not None:
            return number, (yield from self._state(session_id, number))
        pages = _VersionPages(session_id, {"tag": checkpoint_tag(checkpoint_id)}, first=1)
        while not pages.done:
            rows = yield from pages.next_page()
            if rows:
                newest = max(rows, key=lambda row: int(row["number"]))
                number = int(newest["number"])
                self._numbers.put((session_id, checkpoint_id), number)
                self._states.put((session_id, number), newest["state"])
                return number, newest["state"]
        return None

    def _number_of(self, session_id: str, checkpoint_id: str) -> Op:
        """The newest version number holding this checkpoint, or None."""
        cached = self._numbers.get((session_id, checkpoint_id))
        if cached is not None:
            return cached
        matches = yield from _VersionPages(session_id, {"tag": checkpoint_tag(checkpoint_id)}, with_state=False).all()
        if not matches:
            return None
        number = max(int(v["number"]) for v in matches)
        self._numbers.put((session_id, checkpoint_id), number)
        return number

    # -- pending writes ----------------------------------------------------------------------------

    def _rewinds(self, session_id: str) -> Op:
        """Rewind version number -> (number of the non-rewind version it restores, created_at)."""
        found = yield from _VersionPages(session_id, {"kind": "rewind"}, with_state=False).all()
        return _rewind_targets(found)

    def _collect_writes(self, writes_session: str, versions: Rows) -> Op:
        """Pending writes from the write versions, in LangGraph's order. A regular write keeps its first
        value (as other savers do on conflict); special channels (errors, interrupts) keep the last."""
        by_key: dict[tuple[str, int], tuple[str, str, Any, str]] = {}
        for meta in sorted(versions, key=lambda v: int(v["number"])):
            state = meta["state"] if "state" in meta else (yield from self._state(writes_session, int(meta["number"])))
            for idx, channel, value in state["writes"]:
                key = (state["task_id"], int(idx))
                if key in by_key and key[1] >= 0:
                    continue
                by_key[key] = (state["task_id"], channel, value, state.get("task_path", ""))
        ordered = sorted(by_key.items(), key=lambda item: (item[1][3], item[0][0], item[0][1]))
        return [(task_id, channel, self._decode(value)) for (_, _), (task_id, channel, value, _) in ordered]

    # -- operations --------------------------------------------------------------------------------

    def _get_tuple(self, config: RunnableConfig) -> Op:
        conf = config["configurable"]
        thread_id, ns = str(conf["thread_id"]), conf.get("checkpoint_ns", "")
        session_id = yield from self._find_session(thread_id, ns)
        if session_id is None:
            return None
        checkpoint_id = get_checkpoint_id(config)
        window: tuple[datetime | None, datetime | None] = (None, None)
        number: int | None = None  # of the checkpoint asked for by id
        if checkpoint_id:
            try:
                found = yield from self._checkpoint_version(session_id, checkpoint_id)
            except NotFound:
                self._forget(session_id)
                return None
            if found is None:
                return None
            number, state = found
        else:
            try:
                head = yield Call("GET", f"sessions/{session_id}/head/")
            except NotFound as exc:
                # No versions yet, or the session was deleted meanwhile (by another process: forget it,
                # so the thread starts afresh as after delete_thread).
                if exc.code == "session_not_found":
                    self._forget(session_id)
                return None
            self._states.put((session_id, int(head["number"])), head["state"])
            self._heads.put(session_id, (int(head["number"]), head["state"]["checkpoint"]["id"]))
            lineage = (yield from self._root_lineage(thread_id)) if ns else None
            latest = yield from self._latest(session_id, head, lineage)
            if latest is None:
                return None
            head, window = latest
            state = head["state"]
            checkpoint_id = state["checkpoint"]["id"]
        writes_session = yield from self._find_session(thread_id, ns, writes=True)
        if writes_session is None:
            return self._tuple_from(state, thread_id, ns, [])
        rows = yield from _VersionPages(writes_session, {"tag": checkpoint_tag(checkpoint_id)}).all()
        if number is not None and rows:
            # Its writes are those made before the first rewind back to it (later ones belong to that
            # rewind). A checkpoint without writes needs no rewinds (a request saved).
            rewinds = yield from self._rewinds(session_id)
            window = (None, min((when for target, when in rewinds.values() if target == number), default=None))
        writes = yield from self._collect_writes(writes_session, _within(rows, window))
        return self._tuple_from(state, thread_id, ns, writes)

    def _root_lineage(self, thread_id: str) -> Op:
        """The root thread's `_Lineage` (when its versions are on its current branch), or None when it
        was never rewound: one request for its rewinds; then one for its newest version, and one for
        each rewound-to version not seen before."""
        root = yield from self._find_session(thread_id, "")
        if root is None:
            return None
        rewinds = {int(meta["number"]): meta for meta in
                   (yield from _VersionPages(root, {"kind": "rewind"}, with_state=False).all())}
        if not rewinds:
            return None
        try:
            page = yield Call("GET", f"sessions/{root}/versions/", params={"limit": 1})
        except NotFound:
            return None
        newest = next(iter(page.get("results") or []), None)
        if newest is None:
            return None
        spans: builtins.list[tuple[datetime | None, datetime | None]] = []
        current, until = int(newest["number"]), None
        while True:
            earlier = [number for number in rewinds if number <= current]
            if not earlier:
                spans.append((None, until))
                break
            rewound = rewinds[max(earlier)]
            spans.append((_when(rewound["created_at"]), until))
            target = rewound.get("parent")
            if target is None:
                break
            current = int(target)
            until = (_when(rewinds[current]["created_at"]) if current in rewinds
                     else (yield from self._version_facts(root, current))[0])
        resumes: tuple[datetime, datetime, str] | None = None
        if newest.get("kind") == "rewind" and int(newest["number"]) in rewinds:
            target = rewinds[int(newest["number"])].get("parent")
            while target in rewinds:
                target = rewinds[target].get("parent")
            if target is not None:
                made, checkpoint_id = yield from self._version_facts(root, int(target))
                resumes = (_when(newest["created_at"]), made, checkpoint_id)
        return _Lineage(spans, resumes)

    def _latest(self, session_id: str, head: dict[str, Any], lineage: _Lineage | None) -> Op:
        """A namespace's latest checkpoint version as `get_tuple` and `prune` read it, from its `head`,
        with the window of the writes it reads as its own; None when it has none. `lineage`: the root
        thread's, for a subgraph's namespace: rewound past the head, it is its checkpoint as of there."""
        if lineage is not None and not lineage.live(_when(head["created_at"])):
            return (yield from self._as_of_root(session_id, lineage))
        # The writes the head reads as its own: after it, for a head that is a rewind or a data fix.
        return head, ((_when(head["created_at"]), None) if head.get("kind") in RESTARTS else (None, None))

    def _version_facts(self, session_id: str, number: int) -> Op:
        """(created_at, checkpoint id) of a checkpoint version: versions never change, so asked once."""
        known = self._facts.get((session_id, number))
        if known is None:
            found = yield Call("GET", f"sessions/{session_id}/versions/{number}/")
            self._states.put((session_id, number), found["state"])
            known = (_when(found["created_at"]), found["state"]["checkpoint"]["id"])
            self._facts.put((session_id, number), known)
        return known

    def _as_of_root(self, session_id: str, lineage: _Lineage) -> Op:
        """A subgraph namespace's checkpoint as of the root thread's current branch, with the window
        of its writes; None when it had none there (it starts afresh).

        Its newest version made while the root was on that branch: the memory a subgraph compiled
        with ``checkpointer=True`` had at the checkpoint the root was rewound to (LangGraph's replay
        loads the same: its newest checkpoint before the replayed one). While the root's head is
        that rewind, a subgraph task of the rewound-to checkpoint runs again: LangGraph resumes it
        (it cannot tell a rewind from a resume), so it gets the checkpoint that task started
        from, its input on that memory, and runs from there as on a replay, rather than resume a
        finished memory and do nothing."""
        found = None
        for after, before in lineage.spans:
            if before is None or (after is not None and after >= before):
                continue  # the span up to now holds no version newer than the head, which is not in it
            params = {"limit": 1, "with_state": "true", "created_before": before.isoformat()}
            try:
                page = yield Call("GET", f"sessions/{session_id}/versions/", params=params)
            except NotFound:
                return None
            row = next(iter(page.get("results") or []), None)
            if row is not None and (after is None or _when(row["created_at"]) > after):
                start = _when(row["created_at"]) if row.get("kind") in RESTARTS else None
                found = (row, (start, before))
                break
        if found is None or lineage.resumes is None:
            return found
        rewound_at, target_made, target_id = lineage.resumes
        memory_id = found[0]["state"]["checkpoint"]["id"]
        try:
            page = yield Call("GET", f"sessions/{session_id}/versions/", params={
                "created_after": target_made.isoformat(), "created_before": rewound_at.isoformat(),
                "ordering": "number", "limit": 5, "with_state": "true"})
        except NotFound:
            return None
        for row in page.get("results") or []:
            state = row["state"]
            metadata = state.get("metadata") or {}
            if (row.get("kind") != "rewind" and metadata.get("source") == "input"
                    and (metadata.get("parents") or {}).get("") == target_id
                    and state.get("parent_checkpoint_id") == memory_id):
                return row, (rewound_at, None)  # its writes from before the rewind are the run it left
        return found

    def _list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None,
        before: RunnableConfig | None,
        limit: int | None,
    ) -> Op:
        if config is None or "thread_id" not in (config.get("configurable") or {}):
            yield from self._list_all_threads(filter=filter, before=before, limit=limit)
            return
        conf = config["configurable"]
        if "checkpoint_ns" not in conf:
            # As LangGraph's own savers do: no namespace given, every namespace of the thread (root first).
            sessions = yield from self._thread_sessions(str(conf["thread_id"]))
            sessions.sort(key=lambda session: (self._thread_of(session) or ("", ""))[1] != "")
            yield from self._list_threads(sessions, checkpoint_id=get_checkpoint_id(config), filter=filter,
                                          before=before, limit=limit)
            return
        thread_id, ns = str(conf["thread_id"]), conf["checkpoint_ns"]
        session_id = yield from self._find_session(thread_id, ns)
        if session_id is None:
            return
        wanted_id = get_checkpoint_id(config)
        before_id = get_checkpoint_id(before) if before else None
        writes_session = yield from self._find_session(thread_id, ns, writes=True)
        pending = None if writes_session is None else _PendingWrites(writes_session, limit, self._collect_writes)
        if wanted_id:
            # One checkpoint: only the versions tagged with it (its rewinds, untagged, are read apart).
            pages = _VersionPages(session_id, {"tag": checkpoint_tag(wanted_id)})
        else:
            # Checkpoints come newest first, a page of states at a time as the caller reads on; a small
            # `limit` needs only a small first page (one more for a rewind at the head).
            first = limit + 1 if limit is not None and not filter and not before else STATES_PAGE
            pages = _VersionPages(session_id, first=first)
        rewound = _RewindEnds()
        seen: set[str] = set()
        emitted = 0
        while not pages.done:
            for meta in (yield from pages.next_page()):
                first_rewind = rewound.saw(meta)
                if meta.get("kind") == "rewind":
                    continue  # the same checkpoint as its target, which is listed where it was made
                cp_tags = [tag for tag in meta.get("tags") or [] if tag.startswith("cp:")]
                if cp_tags and cp_tags[0] in seen:
                    continue
                number, state = int(meta["number"]), meta["state"]
                self._states.put((session_id, number), state)
                checkpoint_id = state["checkpoint"]["id"]
                if checkpoint_id in seen:
                    continue
                seen.add(checkpoint_id)
                if cp_tags:
                    seen.add(cp_tags[0])
                if wanted_id and checkpoint_id != wanted_id:
                    continue
                if before_id and checkpoint_id >= before_id:
                    continue
                if filter:
                    metadata = {key: self._decode(value) for key, value in state["metadata"].items()}
                    if any(metadata.get(key) != value for key, value in filter.items()):
                        continue
                writes: builtins.list[Any] = []
                if pending is not None:
                    if wanted_id:
                        rewinds = yield from self._rewinds(session_id)
                        first_rewind = min((when for target, when in rewinds.values() if target == number), default=None)
                    # Its writes are those made before the first rewind back to it (later ones belong to that
                    # rewind); a data fix's, those made after it (earlier ones were made on the state it fixed).
                    start = _when(meta["created_at"]) if meta.get("kind") == "data_fix" else None
                    writes = yield from pending.of(checkpoint_id, first_rewind, emitted, start)
                yield _Item(self._tuple_from(state, thread_id, ns, writes))
                emitted += 1
                if limit is not None and emitted >= limit:
                    return

    def _list_all_threads(self, *, filter: dict[str, Any] | None, before: RunnableConfig | None,
                          limit: int | None) -> Op:
        """`list(None, ...)`: every thread's checkpoints, thread after thread (LangGraph's search)."""
        sessions = yield from self._sessions_tagged("langgraph")
        yield from self._list_threads(sessions, checkpoint_id=None, filter=filter, before=before, limit=limit)

    def _list_threads(self, sessions: Rows, *, checkpoint_id: str | None, filter: dict[str, Any] | None,
                      before: RunnableConfig | None, limit: int | None) -> Op:
        """The checkpoints of each (thread, namespace) among `sessions`, one after another."""
        listed = [0]
        for session in sessions:
            found = self._thread_of(session)
            if found is None:
                continue
            if limit is not None and listed[0] >= limit:
                return
            configurable = {"thread_id": found[0], "checkpoint_ns": found[1]}
            if checkpoint_id:
                configurable["checkpoint_id"] = checkpoint_id
            remaining = None if limit is None else limit - listed[0]
            thread: RunnableConfig = {"configurable": configurable}
            yield from _counting(self._list(thread, filter=filter, before=before, limit=remaining), listed)

    def _thread_of(self, session: dict[str, Any]) -> tuple[str, str] | None:
        """(thread id, namespace) of a checkpoint session (None for a session of pending writes)."""
        meta = _langgraph_meta(session)
        noted = _thread_noted(meta)
        if meta.get("pending_writes") or noted is None:
            return None
        thread_id, ns = noted, meta.get("checkpoint_ns", "")
        external_id = session.get("external_id") or ""
        if external_id not in self._external_ids(thread_id, ns):
            # Forked in Session Rewind: the metadata is its source's, the external id is its thread.
            if ns or not external_id.startswith(self.prefix):
                return None
            forked_to = _unescape(external_id[len(self.prefix):])
            if forked_to is None:
                return None
            thread_id = forked_to
        return thread_id, ns

    def _put(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata) -> Op:
        conf = config["configurable"]
        thread_id, ns = str(conf["thread_id"]), conf.get("checkpoint_ns", "")
        parent_id = conf.get("checkpoint_id")
        metadata = get_checkpoint_metadata(config, metadata)
        metadata.pop("writes", None)  # type: ignore[typeddict-item]
        session_id = yield from self._ensure_session(thread_id, ns)
        state = self._state_for(checkpoint, metadata, parent_id)
        body = {
            "state": state,
            "step": step_name(checkpoint, metadata),
            "engine": ENGINE,
            "engine_version": self.engine_version,
            "tags": [checkpoint_tag(checkpoint["id"])],
        }
        for attempt in range(3):
            # The head this saver last wrote saves a request per checkpoint; if anything else moved it,
            # the write below gets a 409 and the second attempt asks the server.
            known = self._heads.get(session_id) if attempt == 0 else None
            head_number, head_checkpoint = known if known is not None else (None, None)
            try:
                if head_number is None:
                    head = yield Call("GET", f"sessions/{session_id}/")
                    head_number = int(head.get("head") or 0)
                if parent_id and head_number:
                    if head_checkpoint is None:
                        head_checkpoint = yield from self._checkpoint_at_head(session_id)
                    if head_checkpoint != parent_id:
                        head_number = yield from self._branch_from(session_id, parent_id, head_number)
                created = yield Call("POST", f"sessions/{session_id}/versions/",
                                     json={**body, "expected_version": head_number})
            except ConflictError as exc:
                if exc.code != "version_conflict":
                    raise  # e.g. session_archived: retrying cannot help, and the caller must see why
                self._heads.pop(session_id)
                continue  # someone else (an operator's rewind, another process) moved the head: decide again
            except NotFound as exc:
                if exc.code != "session_not_found":
                    raise
                session_id = yield from self._recreate(session_id, thread_id, ns)
                continue
            self._heads.put(session_id, (int(created["number"]), checkpoint["id"]))
            self._numbers.put((session_id, checkpoint["id"]), int(created["number"]))
            break
        else:
            raise ConflictError(f"the head of thread {thread_id!r} kept moving; checkpoint {checkpoint['id']} not saved")
        return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": checkpoint["id"]}}

    def _set_status(self, thread_id: str, status: str) -> Op:
        session_id = yield from self._ensure_session(str(thread_id), "")
        yield Call("PATCH", f"sessions/{session_id}/", json={"status": status})
        return None

    def _recreate(self, session_id: str, thread_id: str, ns: str, *, writes: bool = False) -> Op:
        """A new session for a thread whose session another process (or an operator) deleted while
        this saver still knew it: the thread starts afresh, as after this saver's own delete_thread."""
        self._forget(session_id)
        return (yield from self._ensure_session(thread_id, ns, writes=writes))

    def _checkpoint_at_head(self, session_id: str) -> Op:
        head = yield Call("GET", f"sessions/{session_id}/head/")
        self._states.put((session_id, int(head["number"])), head["state"])
        return head["state"]["checkpoint"]["id"]

    def _branch_from(self, session_id: str, parent_id: str, head_number: int) -> Op:
        """Rewind to the parent checkpoint so the new one starts a visible branch; returns the new head."""
        number = yield from self._number_of(session_id, parent_id)
        if number is None:
            return head_number  # parent unknown here (e.g. pruned): append after the head
        rewound = yield Call(
            "POST", f"sessions/{session_id}/rewind/",
            json={"to_version": number, "expected_version": head_number,
                  "reason": f"langgraph: new checkpoint from checkpoint {_short(parent_id)} (update_state or replay)"},
        )
        return int(rewound["number"])

    def _put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str) -> Op:
        if not writes:
            return None
        conf = config["configurable"]
        thread_id, ns, checkpoint_id = str(conf["thread_id"]), conf.get("checkpoint_ns", ""), conf["checkpoint_id"]
        session_id = yield from self._ensure_session(thread_id, ns, writes=True)
        entries = [[WRITES_IDX_MAP.get(channel, idx), channel, self._encode(value)] for idx, (channel, value) in enumerate(writes)]
        state = {"checkpoint_id": checkpoint_id, "task_id": task_id, "task_path": task_path, "writes": entries}
        # The same task writing the same thing again is a retry: the key makes it land once. But not once
        # the checkpoint was rewound to (a new head version holding it): the task runs again there, and its
        # writes, made after the rewind, must be stored again, or they read as the old run's (by time) and
        # the thread shows no pending interrupt while it waits on one.
        thread_session = self._sessions.get(self._external_id(thread_id, ns))
        head = self._heads.get(thread_session[0]) if thread_session is not None else None
        generation = head[0] if head is not None and head[1] == checkpoint_id else ""
        key = "lg-writes:" + _hash(f"{checkpoint_id}\x00{generation}\x00{task_id}\x00{task_path}\x00{entries!r}")[:48]
        body = {"state": state, "step": task_path or task_id, "engine": ENGINE, "engine_version": self.engine_version,
                "tags": [checkpoint_tag(checkpoint_id)]}
        try:
            yield Call("POST", f"sessions/{session_id}/versions/", json=body, idempotency_key=key)
        except NotFound as exc:
            if exc.code != "session_not_found":
                raise
            session_id = yield from self._recreate(session_id, thread_id, ns, writes=True)
            yield Call("POST", f"sessions/{session_id}/versions/", json=body, idempotency_key=key)
        return None

    def _belongs(self, session: dict[str, Any], thread_id: str) -> bool:
        """True when `session` is one this saver made for `thread_id`. A session forked in Session
        Rewind carries its source's tags and metadata, so the tag alone would claim the fork for
        the source thread (and `delete_thread` of the source would delete it)."""
        meta = _langgraph_meta(session)
        if _thread_noted(meta) != thread_id:
            return False
        return session.get("external_id") in self._external_ids(
            thread_id, meta.get("checkpoint_ns", ""), writes=bool(meta.get("pending_writes")))

    def _thread_sessions(self, thread_id: str) -> Op:
        found = [s for s in (yield from self._sessions_tagged(thread_tag(thread_id))) if self._belongs(s, thread_id)]
        # A fork made in Session Rewind onto this thread's id is tagged as its source until this saver
        # writes to it: find it by its external id.
        for external_id in (self._external_id(thread_id, ""), self._external_id(thread_id, "", writes=True)):
            if any(s.get("external_id") == external_id for s in found):
                continue
            page = yield Call("GET", "sessions/", params={"external_id": external_id, "limit": 2})
            found.extend(s for s in page.get("results", []) if s.get("external_id") == external_id)
        return found

    def _sessions_tagged(self, tag: str) -> Op:
        # In creation order: in the list's default order (activity) a thread written while the pages
        # are read moves above the cursor, and `list(None)` (or a thread's deletion) missed it.
        params = {"tag": tag, "limit": PAGE, "ordering": "created_at"}
        found: Rows = []
        call: Call | None = Call("GET", "sessions/", params=params)
        while call is not None:
            page = yield call
            found.extend(s for s in page.get("results", []) if tag in (s.get("tags") or []))
            cursor = page.get("next")
            call = Call("GET", "sessions/", params={**params, "cursor": cursor}) if cursor else None
        return found

    def _delete_sessions(self, sessions: Rows, reason: str) -> Op:
        for session in sessions:
            self._forget(str(session["id"]))
            try:
                yield Call("DELETE", f"sessions/{session['id']}/", params={"reason": reason})
            except NotFound:
                pass

    def _delete_thread(self, thread_id: str) -> Op:
        sessions = yield from self._thread_sessions(thread_id)
        yield from self._delete_sessions(sessions, f"langgraph: delete_thread {_short(thread_id)}")

    def _copy_thread(self, source_thread_id: str, target_thread_id: str) -> Op:
        """Re-record every checkpoint (and its writes) on the target thread, oldest first: a page of
        versions with their states at a time, each page recorded in one batch. The store keeps each
        state once per project, so a copy costs almost no storage."""
        sessions = yield from self._thread_sessions(source_thread_id)
        # Checkpoints first: a namespace's writes are copied knowing whether its head was a data fix.
        sessions.sort(key=lambda session: bool(_langgraph_meta(session).get("pending_writes")))
        rewound: builtins.list[tuple[str, str]] = []  # (target session, checkpoint its source's head was rewound to)
        # Namespace -> (checkpoint tag, when) of a head an operator's data fix made: the writes made for
        # that checkpoint before the fix belong to the run it replaced (see `_latest`). The copy records
        # the fix as a plain checkpoint, which would read them as its own (the tasks that made them, on
        # the state before the fix, would not run again), so they are not copied.
        fixed: dict[str, tuple[str, datetime]] = {}
        for session in sessions:
            meta = _langgraph_meta(session)
            ns, is_writes = meta.get("checkpoint_ns", ""), bool(meta.get("pending_writes"))
            fix = fixed.get(ns) if is_writes else None
            target = yield from self._ensure_session(target_thread_id, ns, writes=is_writes)
            # The versions there were when the thread was listed: a copy onto itself (or a writer
            # still running) adds versions that this walk, oldest first, must not reach.
            last = int(session.get("head") or 0)
            pages = _VersionPages(str(session["id"]), {"ordering": "number"})
            pages.done = not last
            head: dict[str, Any] | None = None
            while not pages.done:
                rows = [row for row in (yield from pages.next_page()) if int(row["number"]) <= last]
                pages.done = pages.done or not rows or int(rows[-1]["number"]) >= last
                head = rows[-1] if rows and int(rows[-1]["number"]) == last else head
                yield from self._record_all(target, [{
                    "state": version_meta["state"], "step": version_meta.get("step") or None, "engine": ENGINE,
                    "engine_version": version_meta.get("engine_version") or self.engine_version,
                    "tags": version_meta.get("tags") or [],
                } for version_meta in rows if version_meta.get("kind") != "rewind" and not (
                    fix is not None and fix[0] in (version_meta.get("tags") or [])
                    and _when(version_meta["created_at"]) < fix[1]
                )])
            if head is not None and head.get("kind") == "rewind" and not is_writes:
                rewound.append((target, head["state"]["checkpoint"]["id"]))
            elif head is not None and head.get("kind") == "data_fix" and not is_writes:
                fixed[ns] = (checkpoint_tag(head["state"]["checkpoint"]["id"]), _when(head["created_at"]))
        # Rewinds are not copied as checkpoints: a copy's head would be the last checkpoint of the branch
        # its source was sent back from. Each is rewound to the same checkpoint, once every write is
        # copied: a checkpoint reads as its own the writes made after the last rewind to it, as there.
        for target, checkpoint_id in rewound:
            number = yield from self._number_of(target, checkpoint_id)
            if number is not None:
                yield Call("POST", f"sessions/{target}/rewind/", json={
                    "to_version": number,
                    "reason": f"langgraph: copy of thread {_short(source_thread_id)}, whose head was rewound to "
                              f"checkpoint {_short(checkpoint_id)}",
                })
                self._forget(target)

    def _record_all(self, session_id: str, snapshots: Rows) -> Op:
        """Record `snapshots` on the session in order, many to a request (batches of at most
        `BATCH_MAX` snapshots and about `BATCH_BYTES` of JSON)."""
        batch: Rows = []
        size = 0
        for snapshot in snapshots:
            length = len(json.dumps(snapshot["state"], ensure_ascii=False, separators=(",", ":")))
            if batch and (len(batch) >= BATCH_MAX or size + length > BATCH_BYTES):
                yield from self._record_batch(session_id, batch)
                batch, size = [], 0
            batch.append(snapshot)
            size += length
        if batch:
            yield from self._record_batch(session_id, batch)

    def _record_batch(self, session_id: str, snapshots: Rows) -> Op:
        """One batch (all or nothing); one that a server with a lower body limit refuses as too large
        goes again in halves."""
        try:
            yield Call("POST", f"sessions/{session_id}/versions/batch/", json={"versions": snapshots})
        except ValidationError as exc:
            if exc.code != "request_too_large" or len(snapshots) == 1:
                raise
            half = len(snapshots) // 2
            yield from self._record_batch(session_id, snapshots[:half])
            yield from self._record_batch(session_id, snapshots[half:])

    def _prune(self, thread_ids: Sequence[str], strategy: str) -> Op:
        """``delete``: delete the thread. ``keep_latest``: trim each namespace's session to its latest
        checkpoint as `get_tuple` reads it (a subgraph's as of the root thread's rewind, see
        `_as_of_root`), and its writes session to the writes that checkpoint reads as its own, with
        the server's trim: one transaction per session, so a crash part way loses nothing the thread
        reads (it used to delete the sessions, then record the latest checkpoint again). Kept versions
        keep their numbers and times, so the windows that tell a checkpoint's own writes still hold.
        The server keeps each session's head as well, and what a kept rewind restored (`list` shows a
        checkpoint where it was made). Sessions with nothing to keep are
        deleted. History is gone, as asked; DeltaChannel graphs need their ancestors, so do not prune
        those with keep_latest. A thread written meanwhile raises ConflictError, and nothing written
        is removed. Each namespace costs a fixed number of requests: its head, its checkpoint's writes
        in one listing, and a trim per session."""
        if strategy not in ("keep_latest", "delete"):
            raise ValueError(f"unknown prune strategy {strategy!r}; use keep_latest or delete")
        for thread_id in thread_ids:
            if strategy == "delete":
                yield from self._delete_thread(thread_id)
                continue
            reason = f"langgraph: prune {_short(thread_id)} (keep_latest)"
            sessions = yield from self._thread_sessions(thread_id)
            writes_sessions = {str(s.get("external_id")): s for s in sessions if _langgraph_meta(s).get("pending_writes")}
            checkpoint_sessions = [s for s in sessions if not _langgraph_meta(s).get("pending_writes")]
            lineage: _Lineage | None = None
            if any(_langgraph_meta(s).get("checkpoint_ns") for s in checkpoint_sessions):
                lineage = yield from self._root_lineage(thread_id)
            trims: builtins.list[tuple[str, set[int], int]] = []  # (session, numbers to keep, its head)
            doomed: Rows = []
            for session in checkpoint_sessions:
                ns = _langgraph_meta(session).get("checkpoint_ns", "")
                session_id = str(session["id"])
                writes = next((writes_sessions.pop(name) for name in self._external_ids(thread_id, ns, writes=True)
                               if name in writes_sessions), None)
                if writes is None and (found := (yield from self._find_session(thread_id, ns, writes=True))) is not None:
                    writes = yield Call("GET", f"sessions/{found}/")
                try:
                    head = yield Call("GET", f"sessions/{session_id}/head/")
                except NotFound:
                    head = None
                latest = None if head is None else (yield from self._latest(session_id, head, lineage if ns else None))
                if head is None or latest is None:
                    doomed.extend(s for s in (session, writes) if s is not None)
                    continue
                kept, window = latest
                trims.append((session_id, {int(head["number"]), int(kept["number"])}, int(head["number"])))
                if writes is None:
                    continue
                checkpoint_id = kept["state"]["checkpoint"]["id"]
                rows = yield from _VersionPages(str(writes["id"]), {"tag": checkpoint_tag(checkpoint_id)},
                                                with_state=False).all()
                own = {int(meta["number"]) for meta in _within(rows, window)}
                if own and writes.get("head"):
                    trims.append((str(writes["id"]), own | {int(writes["head"])}, int(writes["head"])))
                else:
                    doomed.append(writes)
            doomed.extend(writes_sessions.values())  # writes of a namespace with no checkpoints
            for session_id, numbers, head_number in trims:
                yield Call("POST", f"sessions/{session_id}/trim/",
                           json={"keep": sorted(numbers), "reason": reason, "expected_version": head_number})
                self._forget(session_id)
            yield from self._delete_sessions(doomed, reason)


def _short(identifier: Any, limit: int = 200) -> str:
    """An id for an audit reason (at most 2000 characters on the server, no NUL): thread ids may be long."""
    text = str(identifier).replace("\x00", "\\x00")
    return text if len(text) <= limit else text[:limit] + "…"
