"""The database side of the state tree: node rows, compression, caching and verified reads.

Caching is an accelerator only. Node encodings are immutable per (project, digest), so decoded
nodes, and the spliced text of runs (which many versions share whole), are cached in-process;
whole head states are cached in Django's cache (Redis in production). Nodes are not put in Redis:
a round trip there costs as much as the indexed PostgreSQL lookup it would save.
Whatever a read is assembled from, its SHA-256 must equal the version's checksum; if a cached
piece is bad the read is retried from the database alone, and if that fails too it is an
IntegrityProblem naming the version. Existence checks on the write path always ask the database.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
import zstandard
from django.conf import settings
from django.core.cache import cache
from django.db import connection, transaction
from django.db.models import Min
from django.utils import timezone

from sessions_app import background
from sessions_app.errors import IntegrityProblem
from sessions_app.models import WorkflowSession
from snapshots_app import tree
from snapshots_app.models import StateNode, Version

CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_ZSTD_DICT = 2  # zstd with a project dictionary: compaction re-encodes to it, writes use it once there is one
COMPRESS_MIN = 64  # smaller nodes are stored raw: zstd's frame header would not pay for itself
ZSTD_LEVEL = 3  # on the write path; measured: level 6 cost 4x the time for 2% smaller nodes (compaction re-encodes harder)
DICTIONARY_BYTES = 64 * 1024
# A project without a dictionary gets one trained once a process has written this many new nodes
# (and bytes) for it: small nodes compress poorly alone, a dictionary brings them near whole-state zstd.
DICTIONARY_TRAIN_MIN_NODES = 500
DICTIONARY_TRAIN_MIN_BYTES = 1024 * 1024
DICTIONARY_SAMPLE_MAX_BYTES = 4 * 1024 * 1024  # per project, while collecting
DICTIONARY_SAMPLE_PROJECTS = 16  # projects collected for at once, per process
DICTIONARY_RECHECK_SECONDS = 60  # how soon a writer notices a dictionary another process trained
STATE_CACHE_TIMEOUT = 24 * 3600
HEAD_CACHE_MAX = 2 * 1024 * 1024
_NODE_TABLE = StateNode._meta.db_table
# One primary-key probe per wanted digest, whatever the statistics say. `digest = ANY(...)` was
# planned, with statistics that undercount a project's nodes, as a scan of all the project's nodes
# filtered by digest, and writes slowed down as the project grew; the LIMIT keeps the planner from
# flattening the lateral probe into such a join.
# Node rows go in as column arrays (NodeRows.arrays, after the project id); callers add the rest.
# Arrays of bytes are bound in binary (%b): as text (%s) psycopg hex-escapes every element and the
# server parses it back, measured 0.38 vs 0.08 ms for eight 2 KB nodes and 0.18 vs 0.08 ms for 50
# digests.
NODE_INSERT_SQL = (
    f"INSERT INTO {_NODE_TABLE} (project_id, digest, codec, data, raw_size, children, seal) "
    "SELECT %s, * FROM unnest(%b::bytea[], %b::smallint[], %b::bytea[], %b::integer[], %b::bytea[], %b::bigint[])"
)
_PROBE_SQL = (
    "SELECT n.digest FROM unnest(%b::bytea[]) AS wanted(digest) CROSS JOIN LATERAL "
    f"(SELECT * FROM {_NODE_TABLE} AS s WHERE s.project_id = %s AND s.digest = wanted.digest LIMIT 1) AS n"
)
# One step down a tree: the node rows below the rows of `walk` (a recursive CTE's working table of
# digest, codec, data, seal, children, level), while level < %(levels)s.
WALK_DOWN_SQL = (
    "SELECT n.digest, n.codec, n.data, n.seal, n.children, walk.level + 1 FROM walk "
    "CROSS JOIN generate_series(0, length(walk.children) / 16 - 1) AS i CROSS JOIN LATERAL "
    f"(SELECT * FROM {_NODE_TABLE} AS s WHERE s.project_id = %(project)s "
    "AND s.digest = substring(walk.children FROM i * 16 + 1 FOR 16) LIMIT 1) AS n WHERE walk.level < %(levels)s"
)
# The rows of the nodes %(wanted)b, as the first level (1) of a recursive walk.
_WANTED_NODES_SQL = (
    "SELECT n.digest, n.codec, n.data, n.seal, n.children, 1 FROM unnest(%(wanted)b::bytea[]) AS wanted(digest) "
    f"CROSS JOIN LATERAL (SELECT * FROM {_NODE_TABLE} AS s WHERE s.project_id = %(project)s "
    "AND s.digest = wanted.digest LIMIT 1) AS n"
)
# The same for node rows, plus what lies below what was found, down to %(levels)s levels (a whole
# read or a diff wants it next; 1 = only the nodes asked for): one round trip for several levels.
# Nodes the caller already holds come along needlessly, but cheaply; one reachable twice comes
# twice (the caller keeps one).
_PROBE_LEVELS_SQL = (
    "WITH RECURSIVE walk(digest, codec, data, seal, children, level) AS ("
    f"{_WANTED_NODES_SQL} "
    f"UNION ALL {WALK_DOWN_SQL}) SELECT digest, codec, data, seal FROM walk"
)
# The same for a diff, which asks for both sides' differing nodes at once: below them it does not
# descend into a child that more than one node of the level has, i.e. (nearly always) one that both
# sides share, which the diff skips by digest. A pruned node the diff does need after all is fetched
# when it is asked for. DIFF_DOWN_SQL is that step down (rows.version_pair_tree starts it at two roots).
DIFF_DOWN_SQL = (
    "SELECT n.digest, n.codec, n.data, n.seal, n.children, c.level + 1 FROM "
    "(SELECT child, level, count(*) OVER (PARTITION BY child) AS parents FROM "
    "(SELECT substring(walk.children FROM i * 16 + 1 FOR 16) AS child, walk.level FROM walk "
    "CROSS JOIN generate_series(0, length(walk.children) / 16 - 1) AS i WHERE walk.level < %(levels)s) AS x) AS c "
    f"CROSS JOIN LATERAL (SELECT * FROM {_NODE_TABLE} AS s WHERE s.project_id = %(project)s "
    "AND s.digest = c.child LIMIT 1) AS n WHERE c.parents = 1"
)
_PROBE_DIFF_SQL = (
    "WITH RECURSIVE walk(digest, codec, data, seal, children, level) AS ("
    f"{_WANTED_NODES_SQL} UNION ALL {DIFF_DOWN_SQL}) SELECT digest, codec, data, seal FROM walk"
)
# Every node of a version's tree, digests and children only, in one round trip (a writer that has
# not seen the session's head yet learns its tree). UNION, not UNION ALL: a subtree that appears
# twice is walked once.
_SHAPE_DOWN_SQL = (
    "UNION SELECT n.digest, n.children FROM walk CROSS JOIN generate_series(0, length(walk.children) / 16 - 1) "
    f"AS i CROSS JOIN LATERAL (SELECT s.digest, s.children FROM {_NODE_TABLE} AS s "
    "WHERE s.project_id = %(project)s AND s.digest = substring(walk.children FROM i * 16 + 1 FOR 16) LIMIT 1) AS n"
)
_TREE_SHAPE_SQL = (
    "WITH RECURSIVE walk(digest, children) AS ("
    f"SELECT n.digest, n.children FROM {Version._meta.db_table} AS v CROSS JOIN LATERAL "
    f"(SELECT s.digest, s.children FROM {_NODE_TABLE} AS s WHERE s.project_id = %(project)s "
    "AND s.digest = v.root LIMIT 1) AS n WHERE v.session_id = %(session)s AND v.number = %(number)s "
    f"{_SHAPE_DOWN_SQL}) SELECT digest, children FROM walk"
)
# The same for a session's current head, with its number first (on a row of its own, digest NULL),
# read without a lock: a writer that does not know the head learns both in one round trip, and its
# write statement checks under the lock that the head is still that one.
_HEAD_TREE_SHAPE_SQL = (
    f"WITH RECURSIVE head AS (SELECT head_number FROM {WorkflowSession._meta.db_table} WHERE id = %(session)s), "
    "walk(digest, children) AS ("
    f"SELECT n.digest, n.children FROM head JOIN {Version._meta.db_table} AS v "
    "ON v.session_id = %(session)s AND v.number = head.head_number CROSS JOIN LATERAL "
    f"(SELECT s.digest, s.children FROM {_NODE_TABLE} AS s WHERE s.project_id = %(project)s "
    f"AND s.digest = v.root LIMIT 1) AS n {_SHAPE_DOWN_SQL}"
    ") SELECT head_number, NULL::bytea, NULL::bytea FROM head UNION ALL SELECT NULL, digest, children FROM walk"
)
RUN_KINDS = (tree.KIND_ITEMS, tree.KIND_MEMBERS)
# Tree levels fetched per round trip by a whole read and by a diff (measured on the agent profile:
# reads ~10% faster than with 2, diffs ~14% faster than with 1 even when they still fetched the
# runs both sides share, which _PROBE_DIFF_SQL now leaves out).
READ_LEVELS = 3
DIFF_LEVELS = 3
RUN_TEXT_CACHE_MAX = 4 * 1024 * 1024

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; one per thread.
    if not hasattr(_local, "compressor"):
        _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    _compressor()
    return _local.decompressor


def compress(raw: bytes, dictionary: zstandard.ZstdCompressionDict | None = None) -> tuple[int, bytes]:
    if len(raw) < COMPRESS_MIN:
        return CODEC_RAW, raw
    if dictionary is None:
        codec, packed = CODEC_ZSTD, _compressor().compress(raw)
    else:
        codec, packed = CODEC_ZSTD_DICT, _dict_compressor(dictionary).compress(raw)
    if len(packed) >= len(raw):
        return CODEC_RAW, raw
    return codec, packed


def _dict_compressor(dictionary: zstandard.ZstdCompressionDict) -> zstandard.ZstdCompressor:
    if not hasattr(_local, "dict_compressors"):
        _local.dict_compressors = {}
    compressor = _local.dict_compressors.get(dictionary.dict_id())
    if compressor is None:
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, dict_data=dictionary)
        _local.dict_compressors[dictionary.dict_id()] = compressor
    return compressor


# Project dictionaries for writing: (when looked up, newest committed dictionary or None) per project.
_write_dictionaries: dict[int, tuple[float, zstandard.ZstdCompressionDict | None]] = {}


def _project_dictionary(project_id: int) -> zstandard.ZstdCompressionDict | None:
    """The project's newest zstd dictionary, if it has one (compaction trains them, and so do writes)."""
    from snapshots_app.models import CompressionDictionary

    known = _write_dictionaries.get(project_id)
    if known is not None and (known[1] is not None or time.monotonic() - known[0] < DICTIONARY_RECHECK_SECONDS):
        return known[1]
    row = CompressionDictionary.objects.filter(project_id=project_id).exclude(data=b"").order_by("-id").first()
    dictionary = None if row is None else zstandard.ZstdCompressionDict(bytes(row.data))
    if row is None or not connection.in_atomic_block:
        _write_dictionaries[project_id] = (time.monotonic(), dictionary)
    else:
        # Seen inside a transaction, the row might be this transaction's own: remember it only
        # once committed, or nodes could name a dictionary that a rollback removed.
        transaction.on_commit(lambda: _write_dictionaries.__setitem__(project_id, (time.monotonic(), dictionary)))
    return dictionary


# Nodes this process wrote for projects that have no dictionary yet, to train one from.
_samples: OrderedDict[int, list[bytes | bytearray | memoryview]] = OrderedDict()
_samples_lock = threading.Lock()


def _dictionary_samples(project_id: int, new: Iterable[bytes]) -> list[bytes | bytearray | memoryview] | None:
    """Collect node encodings of a project without a dictionary; once there are enough (from one
    large write or many small ones), hand them over for training."""
    with _samples_lock:
        samples = _samples.pop(project_id, [])
        samples.extend(raw for raw in new if len(raw) >= COMPRESS_MIN)
        if len(samples) >= DICTIONARY_TRAIN_MIN_NODES and sum(map(len, samples)) >= DICTIONARY_TRAIN_MIN_BYTES:
            return samples
        while sum(map(len, samples)) > DICTIONARY_SAMPLE_MAX_BYTES:
            samples = samples[max(1, len(samples) // 4) :]  # keep the newest
        _samples[project_id] = samples
        while len(_samples) > DICTIONARY_SAMPLE_PROJECTS:
            _samples.popitem(last=False)
        return None


def _train_dictionary(
    project_id: int, samples: list[bytes | bytearray | memoryview]
) -> zstandard.ZstdCompressionDict | None:
    """Train and store a dictionary from recently written nodes, for this write and later ones.

    Small nodes compress poorly alone; a state written in thousands of nodes would otherwise cost
    about twice what zstd makes of it whole. Compaction re-encodes older nodes with it too.
    """
    from snapshots_app.models import CompressionDictionary

    with transaction.atomic():
        row = CompressionDictionary.objects.create(project_id=project_id, data=b"", samples=len(samples))
        try:
            dictionary = zstandard.train_dictionary(
                DICTIONARY_BYTES, samples, dict_id=row.zstd_id, k=0, d=8, steps=4, level=ZSTD_LEVEL
            )
        except zstandard.ZstdError:
            transaction.set_rollback(True)
            return None
        row.data = dictionary.as_bytes()
        row.save(update_fields=["data"])
    # Forget "this project has none": the next write asks the database, which has this row once
    # committed (and already does for the rest of this transaction).
    _write_dictionaries.pop(project_id, None)
    transaction.on_commit(lambda: _write_dictionaries.__setitem__(project_id, (time.monotonic(), dictionary)))
    return dictionary


def decompress(codec: int, data: bytes) -> bytes:
    if codec == CODEC_RAW:
        return data
    if codec == CODEC_ZSTD:
        return _decompressor().decompress(data)
    if codec == CODEC_ZSTD_DICT:
        return _dict_decompressor(zstandard.get_frame_parameters(data).dict_id).decompress(data)
    raise ValueError(f"unknown codec {codec}")


def sealed_encoding(digest: bytes, codec: int, data: bytes, seal: int | None) -> bytes:
    """A stored node's encoding, checked against its seal (unless `seal` is None); CorruptNode if it
    does not decompress or does not match."""
    try:
        raw = decompress(codec, data)
    except Exception as exc:  # noqa: BLE001 - any decompression failure is corruption of this node
        raise CorruptNode(digest, str(exc)) from None
    if seal is not None and tree.seal_of(raw) != seal:
        raise CorruptNode(digest, "its seal does not match its content")
    return raw


def _dict_decompressor(zstd_id: int) -> zstandard.ZstdDecompressor:
    """A decompressor for a project dictionary (compaction re-encodes nodes with it; see compaction)."""
    from snapshots_app.models import CompressionDictionary

    if not hasattr(_local, "dict_decompressors"):
        _local.dict_decompressors = {}
    decompressor = _local.dict_decompressors.get(zstd_id)
    if decompressor is None:
        row = CompressionDictionary.objects.filter(pk=zstd_id - CompressionDictionary.ZSTD_ID_BASE).first()
        if row is None:
            raise ValueError(f"zstd dictionary {zstd_id} does not exist")
        decompressor = zstandard.ZstdDecompressor(dict_data=zstandard.ZstdCompressionDict(bytes(row.data)))
        _local.dict_decompressors[zstd_id] = decompressor  # dictionaries never change: cache for good
    return decompressor


def binary_results(cursor: Any) -> None:
    """Have PostgreSQL send this cursor's results in binary: node bodies arrive as bytes instead of
    hex text to decode (measured: 0.3 ms off fetching a 200 KB state's ~100 leaf nodes)."""
    cursor.cursor.format = psycopg.pq.Format.BINARY


class _LRU:
    """Process-local cache, least recently used out first, bounded by the total weight of what it
    holds (the newest item always stays). Node caches key it by (project, digest)."""

    def __init__(self, max_weight: int, weigh: Callable[[Any], int]) -> None:
        self.max_weight = max_weight
        self.weigh = weigh
        self.size = 0
        self.items: OrderedDict[Hashable, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        with self.lock:
            item = self.items.get(key)
            if item is not None:
                self.items.move_to_end(key)
            return item

    def put(self, key: Hashable, item: Any) -> None:
        with self.lock:
            self._put(key, item)

    def get_many(self, project_id: int, digests: Iterable[bytes]) -> dict[bytes, Any]:
        found = {}
        with self.lock:
            for digest in digests:
                item = self.items.get((project_id, digest))
                if item is not None:
                    self.items.move_to_end((project_id, digest))
                    found[digest] = item
        return found

    def put_many(self, project_id: int, items: dict[bytes, Any]) -> None:
        with self.lock:
            for digest, item in items.items():
                self._put((project_id, digest), item)

    def _put(self, key: Hashable, item: Any) -> None:
        old = self.items.pop(key, None)
        if old is not None:
            self.size -= self.weigh(old)
        self.items[key] = item
        self.size += self.weigh(item)
        while self.size > self.max_weight and len(self.items) > 1:
            _, evicted = self.items.popitem(last=False)
            self.size -= self.weigh(evicted)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.items

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.size = 0


class _NodeLRU(_LRU):
    """Decoded nodes, plus `texts`: the spliced text of runs, which many versions share whole."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, lambda node: len(node.text) + 64)
        self.texts = _LRU(max_bytes, lambda text: len(text) + 64)

    def holds(self, project_id: int, digest: bytes) -> bool:
        """Whether the node, or the text of the subtree under it, is cached."""
        return (project_id, digest) in self or (project_id, digest) in self.texts

    def clear(self) -> None:
        super().clear()
        self.texts.clear()


node_lru = _NodeLRU(getattr(settings, "STATE_NODE_CACHE_BYTES", 64 * 1024 * 1024))


def _deleted_key(session_id: Any) -> str:
    return f"state-deleted:{session_id}"


# How long a deleted session stays marked so in the cache: longer than any head-cache write that
# was already on its way when it was deleted (a background thread's, or a slow read's) can take.
DELETED_MARK_SECONDS = 3600


def _head_cache_key(session_id: Any, number: int) -> str:
    # By session and number, not by row id, so a read can look before it has the version's row.
    return f"state:{session_id}:{number}"


class ProjectStore:
    """Node storage for one project. Nothing here ever looks at another project's rows."""

    def __init__(self, project_id: int, *, use_cache: bool = True, levels: int = 1, for_diff: bool = False) -> None:
        self.project_id = project_id
        self.use_cache = use_cache
        self.levels = levels  # how many tree levels `nodes` brings per round trip by default
        self.probe_sql = _PROBE_DIFF_SQL if for_diff else _PROBE_LEVELS_SQL
        # Rows that came along below the ones asked for, kept undecoded until they are asked for
        # (a diff often never needs them: it compares most nodes by digest alone).
        self._stash: dict[bytes, tuple[int, bytes, int]] = {}

    # -- writing -----------------------------------------------------------------------------------

    def existing(self, digests: set[bytes]) -> set[bytes]:
        """Which of `digests` are stored (always the database: a cache could outlive a GC)."""
        if not digests:
            return set()
        if connection.vendor == "postgresql":
            # Raw SQL: this runs once per level of every write, and the ORM would double its cost.
            with connection.cursor() as cursor:
                cursor.execute(_PROBE_SQL, [list(digests), self.project_id])
                return {bytes(row[0]) for row in cursor.fetchall()}
        rows = StateNode.objects.filter(project_id=self.project_id, digest__in=list(digests)).values_list(
            "digest", flat=True
        )
        return {bytes(d) for d in rows}

    def node_rows(self, new_nodes: dict[bytes, bytes]) -> NodeRows:
        """New node encodings compressed into the column arrays of one INSERT (see NODE_INSERT_SQL)."""
        rows = NodeRows()
        dictionary = _project_dictionary(self.project_id)
        if dictionary is None and new_nodes:
            samples = _dictionary_samples(self.project_id, new_nodes.values())
            if samples is not None:
                dictionary = _train_dictionary(self.project_id, samples)
        # Sorted, so concurrent writers sharing new nodes take index locks in one order (no deadlocks);
        # unnest() hands PostgreSQL the rows in this order.
        for digest, raw in sorted(new_nodes.items()):
            codec, data = compress(raw, dictionary)
            rows.digests.append(digest)
            rows.codecs.append(codec)
            rows.datas.append(data)
            rows.sizes.append(len(raw))
            rows.children.append(tree.children_of(raw))
            rows.seals.append(tree.seal_of(raw))
        return rows

    def save_nodes(self, new_nodes: dict[bytes, bytes]) -> int:
        """Insert nodes (ON CONFLICT DO NOTHING); returns the stored (compressed) bytes actually added."""
        if not new_nodes:
            return 0
        rows = self.node_rows(new_nodes)
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(
                    f"{NODE_INSERT_SQL} ON CONFLICT DO NOTHING RETURNING length(data)", [self.project_id, *rows.arrays()]
                )
                return sum(size for (size,) in cursor.fetchall())
        StateNode.objects.bulk_create(
            [
                StateNode(project_id=self.project_id, digest=d, codec=c, data=data, raw_size=n, children=kids, seal=seal)
                for d, c, data, n, kids, seal in zip(*rows.arrays(), strict=True)
            ],
            ignore_conflicts=True,
            batch_size=500,
        )
        return sum(len(data) for data in rows.datas)

    def plan(
        self, state: dict[str, Any], canonical: bytes, checksum: str, known: dict[bytes, tuple[bytes, ...]] | None,
        members: dict[str, bytes] | None = None,
    ) -> tuple[bytes, dict[bytes, bytes]]:
        """The state's root digest and the encodings of its nodes that are not stored yet.

        `known` is the shape of a tree that is stored and stays so while it is the session's head
        (the caller makes sure of that): nodes are then checked against it alone, in memory, and
        anything else counts as new (inserted ON CONFLICT DO NOTHING). Without it the database is
        asked, level by level, so a state that repeats another session's subtrees (a fork's, a
        shared document) still stores them once.
        """
        def memo_digest(kind: int, flavor: int, text: bytes, compute: Callable[[], bytes]) -> bytes:
            return digest_memo.digest(self.project_id, kind, flavor, text, compute)

        if known is None:
            writer = tree.TreeWriter(self.existing, memo_digest)
        else:
            writer = tree.TreeWriter(lambda digests: {digest for digest in digests if digest in known}, memo_digest)
        return writer.write_root(state, canonical, bytes.fromhex(checksum), members), writer.new_nodes

    def write_state(
        self, state: dict[str, Any], canonical: bytes, checksum: str, members: dict[str, bytes] | None = None, *,
        session_id: Any = None, head: int = 0,
    ) -> Written:
        """Store a state's new nodes. The caller holds the project's shared write lock and, when it
        passes `session_id`, that session's row lock with `head` its head version number: the head
        is never garbage while it is the head, so its tree (cached from the last write here, else
        learnt in one round trip) is what the new nodes are checked against (see plan)."""
        known = self._head_shape(session_id, head) if head and connection.vendor == "postgresql" else None
        root, new_nodes = self.plan(state, canonical, checksum, known, members)
        stored = self.save_nodes(new_nodes)
        return Written(root, stored, shape_after(root, new_nodes, known or {}))

    def _head_shape(self, session_id: Any, head: int) -> dict[bytes, tuple[bytes, ...]] | None:
        cached = head_shapes.get(session_id)
        if cached is not None and cached[0] == head:
            return cached[1]
        with connection.cursor() as cursor:
            binary_results(cursor)
            cursor.execute(_TREE_SHAPE_SQL, {"project": self.project_id, "session": session_id, "number": head})
            return {bytes(digest): split_children(bytes(children)) for digest, children in cursor.fetchall()}

    def current_head_shape(self, session_id: Any) -> tuple[int, dict[bytes, tuple[bytes, ...]]]:
        """The session's head number now and the shape of its tree (PostgreSQL), without a lock."""
        head = 0
        shape: dict[bytes, tuple[bytes, ...]] = {}
        with connection.cursor() as cursor:
            binary_results(cursor)
            cursor.execute(_HEAD_TREE_SHAPE_SQL, {"project": self.project_id, "session": session_id})
            for number, digest, children in cursor.fetchall():
                if digest is None:
                    head = number
                else:
                    shape[bytes(digest)] = split_children(bytes(children))
        return head, shape

    # -- reading -----------------------------------------------------------------------------------

    def children(self, digests: Iterable[bytes]) -> dict[bytes, tuple[bytes, ...]]:
        """The child digests of stored nodes, from the bare copy beside each (nothing decompressed
        or decoded: a node whose data is damaged still names its children, so garbage collection
        and retention go on around it while the scrub reports it). Missing nodes are absent."""
        rows = StateNode.objects.filter(project_id=self.project_id, digest__in=list(digests))
        return {bytes(digest): split_children(bytes(children)) for digest, children in rows.values_list("digest", "children")}

    def nodes(self, digests: set[bytes], *, checked: bool = True, levels: int | None = None) -> dict[bytes, tree.Node]:
        """Decoded nodes by digest, from the process cache and then the database. Missing ones are absent.

        Every node read from the database is checked against its seal before it is used or cached
        (CorruptNode otherwise), so the cache only ever holds checked nodes. `checked=False` is for
        a whole read, whose SHA-256 checks every node at once: those nodes are neither seal-checked
        nor cached here (see assemble). `levels` > 1 also fetches what lies that many levels below
        the nodes read from the database, in the same round trip (PostgreSQL), and keeps it, still
        encoded, for when it is asked for.
        """
        found: dict[bytes, tree.Node] = {}
        wanted = set(digests)
        if self.use_cache:
            found.update(node_lru.get_many(self.project_id, wanted))
            wanted -= found.keys()
        from_db: dict[bytes, tree.Node] = {}
        for digest in wanted & self._stash.keys():
            codec, data, seal = self._stash.pop(digest)
            from_db[digest] = self._decode(digest, codec, data, seal if checked else None)
        wanted -= from_db.keys()
        if wanted:
            for stored_digest, codec, stored_data, seal in self._fetch_rows(wanted, levels=levels or self.levels):
                digest = bytes(stored_digest)
                if digest in wanted:
                    if digest not in from_db:  # a node reachable twice comes twice
                        from_db[digest] = self._decode(digest, codec, bytes(stored_data), seal if checked else None)
                elif not (self.use_cache and node_lru.holds(self.project_id, digest)):
                    self._stash.setdefault(digest, (codec, bytes(stored_data), seal))
        found.update(from_db)
        if self.use_cache and checked:
            node_lru.put_many(self.project_id, from_db)
        return found

    def keep_rows(self, rows: Iterable[NodeRow]) -> None:
        """Node rows fetched along with something else, kept encoded until asked for."""
        for stored_digest, codec, stored_data, seal in rows:
            self._stash.setdefault(bytes(stored_digest), (codec, bytes(stored_data), seal))

    def _fetch_rows(self, digests: set[bytes], *, levels: int = 1) -> list[NodeRow]:
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                binary_results(cursor)
                cursor.execute(
                    self.probe_sql, {"wanted": list(digests), "project": self.project_id, "levels": levels}
                )
                return cursor.fetchall()
        return list(
            StateNode.objects.filter(project_id=self.project_id, digest__in=list(digests)).values_list(
                "digest", "codec", "data", "seal"
            )
        )

    @staticmethod
    def _decode(digest: bytes, codec: int, data: bytes, seal: int | None) -> tree.Node:
        raw = sealed_encoding(digest, codec, data, seal)
        try:
            return tree.Node.decode(raw)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is corruption of this node
            raise CorruptNode(digest, str(exc)) from None

    def assemble(self, root: bytes) -> tuple[bytes, Callable[[], None]]:
        """The tree's text, and a function that caches what it was made of: call it only once the
        text has been verified (its nodes were not checked one by one; see nodes)."""

        def fetch(digests: set[bytes]) -> dict[bytes, tree.Node]:
            return self.nodes(digests, checked=False, levels=READ_LEVELS)

        if not self.use_cache:
            return tree.assemble(root, fetch)[0], lambda: None
        texts = node_lru.texts
        data, fetched, spliced = tree.assemble(root, fetch, lambda digests: texts.get_many(self.project_id, digests))

        def keep() -> None:
            node_lru.put_many(self.project_id, fetched)
            # A run's text is the same in every version that shares the run: the next read of any of
            # them splices it whole instead of walking and fetching its items again.
            texts.put_many(
                self.project_id,
                {
                    digest: spliced[digest]
                    for digest, node in fetched.items()
                    if node.kind in RUN_KINDS and len(spliced[digest]) <= RUN_TEXT_CACHE_MAX
                },
            )

        return data, keep


NodeRow = tuple[bytes | memoryview, int, bytes | memoryview, int]  # digest, codec, data, seal


@dataclass
class NodeRows:
    digests: list[bytes] = field(default_factory=list)
    codecs: list[int] = field(default_factory=list)
    datas: list[bytes] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    children: list[bytes] = field(default_factory=list)
    seals: list[int] = field(default_factory=list)

    def arrays(self) -> list[list[Any]]:
        return [self.digests, self.codecs, self.datas, self.sizes, self.children, self.seals]


@dataclass(frozen=True)
class Written:
    root: bytes
    stored_bytes: int
    shape: dict[bytes, tuple[bytes, ...]] | None  # every node of the new tree -> its children, if known


def split_children(children: bytes) -> tuple[bytes, ...]:
    return tuple(children[i : i + tree.DIGEST_SIZE] for i in range(0, len(children), tree.DIGEST_SIZE))


def shape_after(
    root: bytes, new_nodes: dict[bytes, bytes], known: dict[bytes, tuple[bytes, ...]]
) -> dict[bytes, tuple[bytes, ...]] | None:
    """The new tree's digests and children, from its new nodes and the old tree's shape; None if it
    reuses a subtree whose shape is unknown (found by asking the database)."""
    shape: dict[bytes, tuple[bytes, ...]] = {}
    pending = [root]
    while pending:
        digest = pending.pop()
        if digest in shape:
            continue
        encoding = new_nodes.get(digest)
        if encoding is not None:
            children = split_children(tree.children_of(encoding))
        else:
            found = known.get(digest)
            if found is None:
                return None
            children = found
        shape[digest] = children
        pending.extend(children)
    return shape


# Per session, the shape of the head tree this process last wrote: (head number, shape), bounded by
# the nodes held in all (~150 bytes each): a 5 MB state has ~1,200, a 200 KB one ~40. ~30 MB at most.
head_shapes = _LRU(getattr(settings, "STATE_SHAPE_CACHE_NODES", 200_000), lambda entry: len(entry[1]))


class _DigestMemo:
    """The digests of node texts this process hashed lately, by exact text, per project.

    A write hashes every run and every large child of each container it changes, changed or not
    (its digest is how it is found unchanged); most are the same text as in the session's last
    write. Comparing a text with the one remembered for its length runs at memory speed, ~8x faster
    than hashing it again (BLAKE2b: ~1 GB/s here). Exact comparison: a hit is the digest of this
    very text. Bounded by the bytes of text held; small texts are hashed directly.
    """

    MIN_TEXT = 4096

    def __init__(self, max_bytes: int) -> None:
        self.texts = _LRU(max_bytes, lambda entry: len(entry[0]))  # (project, kind, flavor, length) -> (text, digest)

    def digest(self, project_id: int, kind: int, flavor: int, text: bytes, compute: Callable[[], bytes]) -> bytes:
        """The digest of the node spelling `text`: remembered, or `compute()`."""
        if len(text) < self.MIN_TEXT:
            return compute()
        key = (project_id, kind, flavor, len(text))
        found = self.texts.get(key)
        if found is not None and found[0] == text:
            return found[1]  # type: ignore[no-any-return]
        digest = compute()
        self.texts.put(key, (text, digest))
        return digest

    def clear(self) -> None:
        self.texts.clear()


digest_memo = _DigestMemo(getattr(settings, "STATE_DIGEST_MEMO_BYTES", 32 * 1024 * 1024))


class CorruptNode(Exception):
    def __init__(self, digest: bytes, why: str) -> None:
        super().__init__(f"node {digest.hex()} cannot be decoded: {why}")
        self.digest = digest


def remember_node(project_id: int, digest: bytes, codec: int, data: bytes, seal: int) -> None:
    """Cache a node fetched along with something else (a version's root), once its seal checks out;
    a bad one is left for the read that needs it to report."""
    try:
        node = ProjectStore._decode(digest, codec, data, seal)
    except CorruptNode:
        return
    node_lru.put_many(project_id, {digest: node})


def _describe(version: Version) -> str:
    """How an integrity error names a version: by the engine's session id, which operators know, and
    the session's UUID, which is unique across projects."""
    return f"version {version.number} of session {version.session.external_id} ({version.session_id})"


def read_canonical(version: Version, *, use_cache: bool = True) -> bytes:
    """The version's state as canonical JSON bytes, verified against its checksum: the head cache's
    copy for a head, else read_stored."""
    if use_cache and version.session.head_number == version.number:
        cached = verified(version, cached_head(version.session_id, version.number))
        if cached is not None:
            return cached
    return read_stored(version, use_cache=use_cache)


def cached_head(session_id: Any, number: int) -> bytes | None:
    """What the head cache holds for that version, not yet verified (see verified)."""
    cached: bytes | None = cache.get(_head_cache_key(session_id, number))
    return cached


def verified(version: Version, data: bytes | None) -> bytes | None:
    """`data` if it is the version's state (its SHA-256 is the version's checksum), else None."""
    if data is not None and hashlib.sha256(data).hexdigest() == version.checksum:
        return data
    return None


def read_stored(version: Version, *, use_cache: bool = True, prefetched: Iterable[NodeRow] = ()) -> bytes:
    """The version's state assembled from its nodes and verified against its checksum (IntegrityProblem
    if it does not match); a head's refreshes the head cache, on the background thread. `prefetched`:
    node rows of its tree that came with the version (rows.version_with_tree), if any."""
    project_id = version.session.project_id
    try:
        project_store = ProjectStore(project_id, use_cache=use_cache)
        project_store.keep_rows(prefetched)
        data, keep = project_store.assemble(bytes(version.root))
        problem = None if hashlib.sha256(data).hexdigest() == version.checksum else "checksum mismatch"
    except (tree.MissingNode, CorruptNode, KeyError, RecursionError, UnicodeDecodeError) as exc:
        data, problem = b"", str(exc)
    if problem is not None:
        if use_cache:
            # A bad cached piece must not look like corruption: retry from the database alone.
            return read_stored(version, use_cache=False)
        problem = _damaged_node(project_id, bytes(version.root)) or problem
        raise IntegrityProblem(
            f"{_describe(version)} failed verification ({problem}); it will not be served",
            version=version.number,
            session=str(version.session_id),
        )
    keep()
    if use_cache and version.session.head_number == version.number:
        # Off the reader's thread: writing ~200 KB to Redis made a cold head read 2.0-2.2 ms, not 1.6-1.75.
        background.submit(lambda: remember_head(version, data))
    return data


def _damaged_node(project_id: int, root: bytes) -> str | None:
    """What is wrong with the tree under `root`, node by node, each checked against its seal: a whole
    read checks only the text it spells, so a damaged node that still decoded was named by the bogus
    child it spelled ("node a797… is missing", a digest that never existed), and an operator restoring
    the damaged rows looked for the wrong one. None if every node checks out (or has no seal)."""
    project_store = ProjectStore(project_id, use_cache=False)

    def fetch(digests: set[bytes]) -> dict[bytes, tree.Node]:  # each checked against its seal (CorruptNode)
        found = project_store.nodes(digests)
        missing = digests - found.keys()
        if missing:
            raise tree.MissingNode(min(missing))
        return found

    try:
        tree.reachable({root}, fetch)
    except (CorruptNode, tree.MissingNode) as exc:
        return str(exc)
    return None


def tree_rows(project_id: int, roots: set[bytes]) -> list[NodeRow]:
    """The stored rows of these trees' top levels, in one round trip: what read_stored's
    `prefetched` takes, so reading many versions does not cost a query each."""
    return ProjectStore(project_id)._fetch_rows(roots, levels=READ_LEVELS)


def remember_head(version: Version, canonical: bytes) -> None:
    """Warm the head cache with the version's state (for a state just written: after commit)."""
    if len(canonical) <= HEAD_CACHE_MAX:
        key = _head_cache_key(version.session_id, version.number)
        cache.set(key, canonical, STATE_CACHE_TIMEOUT)
        # This runs on a background thread, up to SESSION_NOTIFY_INTERVAL_MS after the write (or a
        # read): the session may have been deleted meanwhile. Set, then look (forget_heads marks,
        # then drops), so whichever comes second removes the copy.
        if cache.get(_deleted_key(version.session_id)) is not None:
            cache.delete(key)


def head_cache_numbers(session: WorkflowSession) -> range:
    """The numbers of the session's versions the head cache may still hold: its head, and each
    version that was the head within the last STATE_CACHE_TIMEOUT (a version is cached only while it
    is the head, and numbers grow with time, so it is the versions from the one before the oldest
    written since then)."""
    since = timezone.now() - timedelta(seconds=STATE_CACHE_TIMEOUT)
    oldest = Version.objects.filter(session=session, created_at__gte=since).aggregate(first=Min("number"))["first"]
    return range(max(1, (oldest or session.head_number) - 1), session.head_number + 1)


def forget_heads(session_id: Any, numbers: range) -> None:
    """Drop those versions' states from the head cache (a deleted session's: its states must not
    outlive it there for a day). Best effort, as every use of the cache (config.cache): during a
    Redis outage they stay until they expire."""
    cache.set(_deleted_key(session_id), 1, DELETED_MARK_SECONDS)  # first: see remember_head
    for start in range(numbers.start, numbers.stop, 1000):
        cache.delete_many([_head_cache_key(session_id, number) for number in range(start, min(start + 1000, numbers.stop))])


def project_write_lock(project_id: int) -> None:
    """Writers share this lock; garbage collection takes it exclusively (see compaction).

    PostgreSQL only: SQLite already serialises write transactions.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock_shared(%s, %s)", [PROJECT_LOCK_CLASS, project_id])


PROJECT_LOCK_CLASS = 4242
