"""The content-addressed state tree: split a state into nodes, and splice nodes back into bytes.

Pure code, no database: callers pass a `lookup` that says which digests already exist and a
`fetch` that returns node encodings. See snapshots_app.store for the database side.

A state's canonical JSON is cut into nodes. A node is a piece of JSON text with *holes*; each hole is
filled by a child node's text. Reading a version is splicing bytes (no parsing); the result is
verified against the version's SHA-256. Most nodes' digest is BLAKE2b over (kind, flavor, the full
text of the subtree), i.e. over what it *means*, not how it is split, so identical subtrees anywhere
in a project share one node and unchanged subtrees are recognised before they are even split. A
node whose holes are runs is stored under the digest of its own encoding (paged_digest, a Merkle
digest: appending to a long history hashes its new runs, not the history), and a state's root
under one derived from the state's SHA-256 (root_digest: the write computes that anyway).

Node kinds:
  o  object              a  array
  m  run of object members (content-defined boundaries, so inserting a key moves few runs)
  p  run of array items   (fixed counts, so appending touches only the last run)
  s  long string          j  string holding JSON text, stored as structure (see FLAVORS)
  c  chunk of a long string's text (a long string with lines is cut into chunks of lines, so a
     scratchpad or log that grows by appending stores its new tail, not itself again)

Encoding of a node: kind(1) flavor(1) level(1) nholes(varint) [offset(varint) digest(16)]* text.
`level` > 0 on a, o, p, m nodes means the holes are runs (of level-1) instead of values; on an s
node, that its holes are chunks; on a j node it is the flavor of the JSON inside.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson

DIGEST_SIZE = 16
INLINE_MAX = 512  # a subtree whose text is at most this many bytes is written inside its parent
# A subtree larger than INLINE_MAX but at most this many bytes is one node, unsplit: a 3 KB chat
# message is one row, not an object node plus a string node. Every node costs a row, an index entry,
# a decompression and a hop in each read, and such small subtrees are rarely edited in place.
SPLIT_MIN = 8192
# A full run of PAGE array items (an old stretch of a chat history, say) is one node up to this size:
# it never changes again, and a read then fetches one row instead of 32. Its items were stored one
# by one while the run filled up, so this costs the run once more (~3% of an agent trace's storage).
RUN_LEAF_MAX = 65536
PAGE = 32  # items per array run, and runs per higher-level run
OBJECT_RUN_MIN = 64  # objects with more members than this are split into member runs
MEMBER_RUN_MASK = 31  # a member run ends after a key whose CRC32 & mask == 0 (about 32 members a run)
JSON_STRING_MIN = INLINE_MAX  # strings shorter than this are never worth parsing as structure
# A string whose text is longer than twice this, and has lines, is stored in chunks of whole lines
# of at least this many bytes, a chunk ending after a line whose CRC32 & CHUNK_MASK is 0 (content-
# defined: appending lines, or editing one, changes the chunk it falls in and no other).
STRING_CHUNK_MIN = 1024
CHUNK_MASK = 3

KIND_OBJECT = ord("o")
KIND_ARRAY = ord("a")
KIND_MEMBERS = ord("m")
KIND_ITEMS = ord("p")
KIND_STRING = ord("s")
KIND_JSON_STRING = ord("j")
KIND_CHUNK = ord("c")
# Kinds whose nodes at level > 0 hold runs (and are stored under paged_digest).
CONTAINER_KINDS = (KIND_OBJECT, KIND_ARRAY, KIND_MEMBERS, KIND_ITEMS)

# Encoders a JSON string's content may have been written with. Flavor 0 is our canonical form.
# A string is stored as structure only if re-encoding its parsed value reproduces it exactly.
CANONICAL = 0


@dataclass(frozen=True)
class Flavor:
    code: int
    item_sep: bytes
    key_sep: bytes
    sort_keys: bool
    encode: Callable[[Any], bytes]


def _py_encoder(**kwargs: Any) -> Callable[[Any], bytes]:
    encoder = json.JSONEncoder(**kwargs)
    return lambda value: encoder.encode(value).encode()


FLAVORS: dict[int, Flavor] = {
    0: Flavor(0, b",", b":", True, lambda value: orjson.dumps(value, option=orjson.OPT_SORT_KEYS)),
    # Python's json.dumps with its defaults: what LlamaIndex Workflows and most Python engines write.
    1: Flavor(1, b", ", b": ", False, _py_encoder()),
    2: Flavor(2, b",", b":", False, _py_encoder(separators=(",", ":"))),
    3: Flavor(3, b", ", b": ", False, _py_encoder(ensure_ascii=False)),
    4: Flavor(4, b",", b":", False, _py_encoder(ensure_ascii=False, separators=(",", ":"))),
}


def node_kind(value: Any) -> int:
    """The kind a value gets when it is stored as a node of its own."""
    if type(value) is dict:
        return KIND_OBJECT
    if type(value) is list:
        return KIND_ARRAY
    return KIND_STRING  # long strings (and, exceptionally, nothing else gets this long)


def digest_of(kind: int, flavor: int, text: bytes) -> bytes:
    h = hashlib.blake2b(bytes((kind, flavor)), digest_size=DIGEST_SIZE)
    h.update(text)
    return h.digest()


def paged_digest(encoding: bytes) -> bytes:
    """The digest of a node whose holes are runs: of its encoding (see TreeWriter.node_of)."""
    return hashlib.blake2b(encoding, digest_size=DIGEST_SIZE, person=b"rewind-paged").digest()


def root_digest(state_sha256: bytes) -> bytes:
    """The digest a state's root node is stored under: derived from the SHA-256 of the state's
    canonical JSON (its version's checksum), which a write computes anyway, so a write hashes the
    whole state once, not twice (~5% of a 200 KB write). A root is only ever compared with roots
    (a diff's two ends, a write finding its state already stored), so roots stored under
    digest_of by earlier versions of this code are simply other digests: both kinds coexist, and
    an identical state written before and after the change is stored twice, once."""
    return hashlib.blake2b(state_sha256, digest_size=DIGEST_SIZE, person=b"rewind-root").digest()


# --------------------------------------------------------------------------------------------------
# Node encoding


def _varint(n: int, out: bytearray) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


@dataclass(frozen=True, slots=True)
class Node:
    kind: int
    flavor: int
    level: int
    holes: tuple[tuple[int, bytes], ...]  # (offset into text, child digest)
    text: bytes
    children: tuple[bytes, ...] = field(init=False, repr=False, compare=False)  # the holes' digests, in order

    def __post_init__(self) -> None:
        object.__setattr__(self, "children", tuple(child for _, child in self.holes))

    def encode(self) -> bytes:
        out = bytearray((self.kind, self.flavor, self.level))
        _varint(len(self.holes), out)
        for offset, child in self.holes:
            _varint(offset, out)
            out += child
        out += self.text
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Node:
        kind, flavor, level = data[0], data[1], data[2]
        count, pos = _read_varint(data, 3)
        holes = []
        for _ in range(count):
            offset, pos = _read_varint(data, pos)
            holes.append((offset, bytes(data[pos : pos + DIGEST_SIZE])))
            pos += DIGEST_SIZE
        return cls(kind, flavor, level, tuple(holes), bytes(data[pos:]))


def children_of(encoding: bytes) -> bytes:
    """The child digests of an encoded node, concatenated in hole order (without decoding its text)."""
    count, pos = _read_varint(encoding, 3)
    out = bytearray()
    for _ in range(count):
        _, pos = _read_varint(encoding, pos)
        out += encoding[pos : pos + DIGEST_SIZE]
        pos += DIGEST_SIZE
    return bytes(out)


def seal_of(encoding: bytes) -> int:
    """BLAKE2b-64 of a node's encoding, as a signed 64-bit integer (how the database keeps it)."""
    return int.from_bytes(hashlib.blake2b(encoding, digest_size=8).digest(), "big", signed=True)


class _TextBuilder:
    """Accumulates a node's text and the positions of its holes."""

    __slots__ = ("holes", "text")

    def __init__(self) -> None:
        self.text = bytearray()
        self.holes: list[tuple[int, bytes]] = []

    def add(self, piece: bytes | Hole) -> None:
        if isinstance(piece, Hole):
            self.holes.append((len(self.text), piece.digest))
        else:
            self.text += piece


@dataclass(frozen=True, slots=True)
class Hole:
    digest: bytes


# --------------------------------------------------------------------------------------------------
# Writing


# A candidate is a child too large to inline that may still have to be written: its digest, and a
# function that stores its node and returns the node's own candidates.
Candidate = tuple[bytes, Callable[[], list["Candidate"]]]


# How a writer finds a digest: `memo(kind, flavor, text, compute)` returns the digest of the node
# spelling `text`, calling `compute()` for it unless it remembers (see store._DigestMemo).
DigestMemo = Callable[[int, int, bytes, Callable[[], bytes]], bytes]


def _no_memo(kind: int, flavor: int, text: bytes, compute: Callable[[], bytes]) -> bytes:
    return compute()


def _is_paged(value: Any, text: bytes, kind: int) -> bool:
    """Whether a value too large to inline is a node whose holes are runs (level > 0)."""
    if len(text) <= SPLIT_MIN:
        return False
    if kind == KIND_ARRAY:
        return len(value) > PAGE
    return kind == KIND_OBJECT and len(value) > OBJECT_RUN_MIN


class TreeWriter:
    """Splits values into nodes, skipping every subtree whose node already exists.

    `existing(digests)` returns the subset of `digests` already stored (the caller's database, for
    the project being written). New nodes collect in `self.new_nodes` (digest -> encoding).

    The tree is written breadth first: all candidates of one depth are checked in one `existing`
    call, so a write costs one round trip per level of change, not one per changed container.
    """

    def __init__(self, existing: Callable[[set[bytes]], set[bytes]], memo: DigestMemo = _no_memo) -> None:
        self._existing = existing
        self._digest = memo
        self.new_nodes: dict[bytes, bytes] = {}
        self._root: Any = None
        self._root_members: dict[str, bytes] = {}

    def write_root(
        self, state: dict[str, Any], canonical: bytes, state_sha256: bytes | None = None,
        members: dict[str, bytes] | None = None,
    ) -> bytes:
        """Store `state` (whose canonical bytes are `canonical`, with that SHA-256 and the canonical
        bytes of each member if the caller has them) and return the root digest."""
        digest = root_digest(state_sha256 or hashlib.sha256(canonical).digest())
        self._root, self._root_members = state, members or {}
        # Build the root before knowing whether it exists, and ask about it together with its
        # children: a new root is the usual case, and this saves a round trip on it.
        frontier = self._write_value(state, canonical, KIND_OBJECT, FLAVORS[CANONICAL], digest)
        present = self._existing({digest} | {child for child, _ in frontier})
        if digest in present:
            self.new_nodes.clear()
            return digest
        while frontier:
            following: list[Candidate] = []
            for child, write in frontier:
                if child not in present and child not in self.new_nodes:
                    following.extend(write())
            wanted = {child for child, _ in following if child not in self.new_nodes}
            present = self._existing(wanted) if wanted else set()
            frontier = following
        return digest

    def _member_texts(self, value: Any) -> dict[str, bytes]:
        """The members' canonical texts the caller handed write_root, if `value` is the root."""
        return self._root_members if value is self._root else {}

    def _piece(self, value: Any, flavor: Flavor, pending: list[Candidate], text: bytes | None = None) -> bytes | Hole:
        """Inline text for a small value (`text` if the caller has it), else a hole for a node
        written if it does not exist."""
        text = text or flavor.encode(value)
        if len(text) <= INLINE_MAX:
            return text
        candidate = self.node_of(value, text, node_kind(value), flavor)
        pending.append(candidate)
        return Hole(candidate[0])

    def node_of(self, value: Any, text: bytes, kind: int, flavor: Flavor) -> Candidate:
        """The digest a value too large to inline is stored under (whatever its parent), and the
        function that stores its node. A node whose holes are runs (a long array or a wide object)
        is stored under the digest of its own encoding, which names its runs by their digests: a
        Merkle digest, so a write that appends to a long history hashes the runs it has not seen
        (and a few hundred bytes), not the whole history. Every other node is stored under the
        digest of the text it spells."""
        if not _is_paged(value, text, kind):
            digest = self._digest(kind, flavor.code, text, lambda: digest_of(kind, flavor.code, text))
            return digest, lambda: self._write_value(value, text, kind, flavor, digest)
        planned: list[tuple[bytes, list[Candidate]]] = []

        def compute() -> bytes:
            planned.append(self._paged(value, kind, flavor))
            return paged_digest(planned[0][0])

        digest = self._digest(kind, flavor.code, text, compute)

        def write() -> list[Candidate]:
            encoding, runs = planned[0] if planned else self._paged(value, kind, flavor)
            self.new_nodes[digest] = encoding
            return runs

        return digest, write

    def _write_value(self, value: Any, text: bytes, kind: int, flavor: Flavor, digest: bytes) -> list[Candidate]:
        if kind != KIND_STRING and len(text) <= SPLIT_MIN:
            return self._write_leaf(digest, kind, flavor.code, text)
        if _is_paged(value, text, kind):  # only a root gets here: other paged values go by node_of
            self.new_nodes[digest], runs = self._paged(value, kind, flavor)
            return runs
        if kind == KIND_OBJECT:
            builder, pending = self._members_text(value, sorted(value) if flavor.sort_keys else list(value), flavor, b"{")
            builder.add(b"}")
        elif kind == KIND_ARRAY:
            builder, pending = self._items_text(value, flavor, b"[")
            builder.add(b"]")
        else:
            return self._write_string(value, text, flavor, digest)
        self._store(digest, kind, flavor.code, 0, builder)
        return pending

    def _write_leaf(self, digest: bytes, kind: int, flavor: int, text: bytes) -> list[Candidate]:
        self.new_nodes[digest] = Node(kind, flavor, 0, (), text).encode()
        return []

    def _store(self, digest: bytes, kind: int, flavor: int, level: int, builder: _TextBuilder) -> None:
        self.new_nodes[digest] = Node(kind, flavor, level, tuple(builder.holes), bytes(builder.text)).encode()

    def _members_text(
        self, value: dict[str, Any], keys: list[str], flavor: Flavor, opener: bytes = b""
    ) -> tuple[_TextBuilder, list[Candidate]]:
        pending: list[Candidate] = []
        builder = _TextBuilder()
        builder.add(opener)
        texts = self._member_texts(value)
        for index, key in enumerate(keys):
            if index:
                builder.add(flavor.item_sep)
            builder.add(flavor.encode(key) + flavor.key_sep)
            builder.add(self._piece(value[key], flavor, pending, texts.get(key)))
        return builder, pending

    def _items_text(self, items: list[Any], flavor: Flavor, opener: bytes = b"") -> tuple[_TextBuilder, list[Candidate]]:
        pending: list[Candidate] = []
        builder = _TextBuilder()
        builder.add(opener)
        for index, item in enumerate(items):
            if index:
                builder.add(flavor.item_sep)
            builder.add(self._piece(item, flavor, pending))
        return builder, pending

    def _paged(self, value: Any, kind: int, flavor: Flavor) -> tuple[bytes, list[Candidate]]:
        """The encoding of a container whose holes are runs, and its runs as candidates. Level 0:
        runs of values (fixed counts of items, so appending touches only the last run; members in
        content-defined runs, so inserting a key changes one run). Each level above groups PAGE
        runs of the level below."""
        if kind == KIND_OBJECT:
            keys = sorted(value) if flavor.sort_keys else list(value)
            runs: list[list[Any]] = [[]]
            for key in keys:
                runs[-1].append(key)
                if zlib.crc32(key.encode()) & MEMBER_RUN_MASK == 0:
                    runs.append([])
            if not runs[-1]:
                runs.pop()
            known = self._member_texts(value)
            texts = [
                flavor.item_sep.join(flavor.encode(k) + flavor.key_sep + (known.get(k) or flavor.encode(value[k])) for k in run)
                for run in runs
            ]
            run_kind, opener, closer = KIND_MEMBERS, b"{", b"}"
        else:
            runs = [value[start : start + PAGE] for start in range(0, len(value), PAGE)]
            texts = [flavor.encode(run)[1:-1] for run in runs]
            run_kind, opener, closer = KIND_ITEMS, b"[", b"]"
        level_runs: list[Candidate] = []
        for run, text in zip(runs, texts, strict=True):
            run_digest = self._digest(run_kind, flavor.code, text, partial(digest_of, run_kind, flavor.code, text))

            def write_leaf(run: Any = run, run_digest: bytes = run_digest, text: bytes = text) -> list[Candidate]:
                if run_kind == KIND_ITEMS and len(run) == PAGE and len(text) <= RUN_LEAF_MAX:
                    return self._write_leaf(run_digest, run_kind, flavor.code, text)
                if run_kind == KIND_ITEMS:
                    builder, pending = self._items_text(run, flavor)
                else:
                    builder, pending = self._members_text(value, run, flavor)
                self._store(run_digest, run_kind, flavor.code, 0, builder)
                return pending

            level_runs.append((run_digest, write_leaf))
        level = 1
        while len(level_runs) > PAGE:
            grouped: list[Candidate] = []
            for start in range(0, len(level_runs), PAGE):
                group = level_runs[start : start + PAGE]
                if len(group) == 1:
                    grouped.append(group[0])  # a group of one is its run
                    continue
                encoding = self._holes_node(run_kind, flavor, level, group, b"", b"")
                group_digest = paged_digest(encoding)

                def write_group(group: list[Candidate] = group, digest: bytes = group_digest,
                                encoding: bytes = encoding) -> list[Candidate]:
                    self.new_nodes[digest] = encoding
                    return group

                grouped.append((group_digest, write_group))
            level_runs = grouped
            level += 1
        return self._holes_node(kind, flavor, level, level_runs, opener, closer), level_runs

    @staticmethod
    def _holes_node(kind: int, flavor: Flavor, level: int, runs: list[Candidate], opener: bytes, closer: bytes) -> bytes:
        builder = _TextBuilder()
        builder.add(opener)
        for index, (run_digest, _) in enumerate(runs):
            if index:
                builder.add(flavor.item_sep)
            builder.add(Hole(run_digest))
        builder.add(closer)
        return Node(kind, flavor.code, level, tuple(builder.holes), bytes(builder.text)).encode()

    def _write_string(self, value: Any, text: bytes, flavor: Flavor, digest: bytes) -> list[Candidate]:
        inner = _json_inside(value) if isinstance(value, str) and len(value) >= JSON_STRING_MIN else None
        if inner is None:
            pieces = _string_pieces(value) if isinstance(value, str) and len(text) > 2 * STRING_CHUNK_MIN else None
            if pieces is None:
                return self._write_leaf(digest, KIND_STRING, flavor.code, text)
            # The text's quotes, and between them the chunks' texts (each a piece's escaped text):
            # a string is escaped character by character, so the pieces' texts spell the string's.
            chunks: list[Candidate] = []
            for piece in pieces:
                chunk = flavor.encode(piece)[1:-1]
                chunk_digest = self._digest(KIND_CHUNK, flavor.code, chunk, partial(digest_of, KIND_CHUNK, flavor.code, chunk))
                chunks.append((chunk_digest, partial(self._write_leaf, chunk_digest, KIND_CHUNK, flavor.code, chunk)))
            self.new_nodes[digest] = Node(
                KIND_STRING, flavor.code, 1, tuple((1, chunk_digest) for chunk_digest, _ in chunks), b'""'
            ).encode()
            return chunks
        parsed, inner_flavor = inner
        # Stored under the same digest as the plain string would be (same meaning); the node says
        # the text is the JSON-string literal of what its one child spells in `inner_flavor`.
        inner_text = inner_flavor.encode(parsed)
        child = self.node_of(parsed, inner_text, KIND_OBJECT if type(parsed) is dict else KIND_ARRAY, inner_flavor)
        self.new_nodes[digest] = Node(KIND_JSON_STRING, flavor.code, inner_flavor.code, ((0, child[0]),), b"").encode()
        return [child]


def _string_pieces(value: str) -> list[str] | None:
    """The string cut after lines into pieces of at least STRING_CHUNK_MIN characters, ending where a
    line's CRC32 says so (see STRING_CHUNK_MIN); None if that makes fewer than two."""
    if "\n" not in value:
        return None
    pieces: list[str] = []
    start = size = 0
    for line in value.split("\n")[:-1]:
        size += len(line) + 1
        if size >= STRING_CHUNK_MIN and zlib.crc32(line.encode()) & CHUNK_MASK == 0:
            end = start + size
            pieces.append(value[start:end])
            start, size = end, 0
    if not pieces:
        return None
    if start < len(value):
        pieces.append(value[start:])
    return pieces if len(pieces) > 1 else None


def value_digest(value: Any, flavor: int, text: bytes | None = None) -> bytes | None:
    """The digest `value` (whose text in `flavor` is `text`, if the caller has it) is stored under as
    a node of its own; None if it is small enough to be always written inline (no node can equal it)."""
    text = text or FLAVORS[flavor].encode(value)
    if len(text) <= INLINE_MAX:
        return None
    return TreeWriter(lambda digests: set()).node_of(value, text, node_kind(value), FLAVORS[flavor])[0]


def json_text_value(text: str) -> Any:
    """The value JSON `text` spells; ValueError if it is not JSON, or holds what no JSON value can:
    NaN, Infinity, a number past a double's range, or a lone surrogate (an escaped half of a UTF-16
    pair: valid JSON text, but no UTF-8 text can hold it, so no change list or answer could show
    it), an integer past 64 bits (states cannot hold one either: the diff's comparisons and every
    answer encode with orjson), or nesting too deep for json.loads. Such a string is kept and
    diffed as a plain string. json.loads takes the first four; orjson refuses them but reads
    integers past 64 bits as floats, so it only vets the text, and json.loads checks the integers
    when a run of digits is long enough to be one."""
    orjson.loads(text)
    try:
        return json.loads(text, parse_int=_int64 if _LONG_DIGIT_RUN.search(text) else None)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


_LONG_DIGIT_RUN = re.compile(r"\d{19}")  # the shortest integer literal past 64 bits has 19 digits


def _int64(literal: str) -> int:
    number = int(literal)
    if not -(2**63) <= number < 2**64:
        raise ValueError(f"integer {literal[:30]} does not fit 64 bits")
    return number


def _json_inside(value: str) -> tuple[Any, Flavor] | None:
    """(parsed, flavor) if `value` is JSON text that one of our flavors re-encodes exactly."""
    if value[0] not in "{[":
        return None
    try:
        parsed = json_text_value(value)
    except ValueError:
        return None
    if type(parsed) not in (dict, list):
        return None
    head = value[:400]
    spaced = ", " in head or ": " in head
    encoded = value.encode()
    for code in (1, 3, 2, 4) if spaced else (2, 4, 1, 3):
        flavor = FLAVORS[code]
        try:
            if flavor.encode(parsed) == encoded:
                return parsed, flavor
        except (TypeError, ValueError):
            return None
    return None


# --------------------------------------------------------------------------------------------------
# Reading


class MissingNode(LookupError):
    def __init__(self, digest: bytes) -> None:
        super().__init__(f"node {digest.hex()} is missing")
        self.digest = digest


def assemble(
    root: bytes,
    fetch: Callable[[set[bytes]], dict[bytes, Node]],
    known_texts: Callable[[set[bytes]], dict[bytes, bytes]] | None = None,
) -> tuple[bytes, dict[bytes, Node], dict[bytes, bytes]]:
    """The full text of the tree under `root`, its nodes fetched level by level (one `fetch` call
    per level), except subtrees whose text `known_texts` returns: those are neither fetched nor
    walked. Returns (text, the nodes fetched, the text of every subtree)."""
    nodes: dict[bytes, Node] = {}
    texts: dict[bytes, bytes] = {}
    frontier = {root}
    while frontier:
        fetched = fetch(frontier)
        missing = frontier - fetched.keys()
        if missing:
            raise MissingNode(next(iter(missing)))
        nodes.update(fetched)
        children = {
            child for node in fetched.values() for child in node.children if child not in nodes and child not in texts
        }
        if children and known_texts is not None:
            found = known_texts(children)
            texts.update(found)
            children -= found.keys()
        frontier = children
    return splice(root, nodes, texts), nodes, texts


def splice(root: bytes, nodes: dict[bytes, Node], memo: dict[bytes, bytes] | None = None) -> bytes:
    """The full text of the tree under `root`. `memo` (subtree texts by digest) is used and filled."""
    if memo is None:
        memo = {}

    def text_of(digest: bytes) -> bytes:
        cached = memo.get(digest)
        if cached is not None:
            return cached
        node = nodes[digest]
        if node.kind == KIND_JSON_STRING:
            inner = text_of(node.holes[0][1]).decode()
            result = FLAVORS[node.flavor].encode(inner)
        elif not node.holes:
            result = node.text
        else:
            parts = []
            position = 0
            text = node.text
            for offset, child in node.holes:
                parts.append(text[position:offset])
                parts.append(text_of(child))
                position = offset
            parts.append(text[position:])
            result = b"".join(parts)
        memo[digest] = result
        return result

    return text_of(root)


def reachable(roots: Iterable[bytes], fetch: Callable[[set[bytes]], dict[bytes, Node]]) -> set[bytes]:
    """Every digest reachable from `roots` (for garbage collection and export)."""
    seen: set[bytes] = set()
    frontier = set(roots)
    while frontier:
        fetched = fetch(frontier)
        seen |= frontier
        frontier = {child for node in fetched.values() for child in node.children if child not in seen}
    return seen


# Holes are parsed as this marker string so a node's own text can be read as JSON; it is random per
# process, so no stored string can collide with it.
_HOLE_TOKEN = "hole-" + secrets.token_hex(16) + "-"
_HOLE_MARK = "\x00" + _HOLE_TOKEN
_HOLE_LITERAL = ('"\\u0000' + _HOLE_TOKEN).encode()


def parse_node(node: Node) -> Any:
    """The node's own text as a Python value, holes replaced by HoleRef(digest). Containers only."""
    if node.kind in (KIND_STRING, KIND_JSON_STRING):
        raise ValueError("string nodes have no structure to parse")
    if node.level > 0:
        # A container or run of runs: its text is only separators around the holes.
        return [HoleRef(child) for child in node.children]
    text = node.text
    if node.kind == KIND_ITEMS:
        text = b"[" + text + b"]"
    elif node.kind == KIND_MEMBERS:
        text = b"{" + text + b"}"
    parts = []
    position = 0
    offset_shift = 1 if node.kind in (KIND_ITEMS, KIND_MEMBERS) else 0
    for index, (offset, _) in enumerate(node.holes):
        parts.append(text[position : offset + offset_shift])
        parts.append(_HOLE_LITERAL + str(index).encode() + b'"')
        position = offset + offset_shift
    parts.append(text[position:])
    value = loads(b"".join(parts), node.flavor)
    holes = node.holes
    if not holes:
        return value
    if type(value) is dict:
        for key, child in value.items():
            if type(child) is str and child.startswith(_HOLE_MARK):
                value[key] = HoleRef(holes[int(child[len(_HOLE_MARK) :])][1])
    else:
        for index, child in enumerate(value):
            if type(child) is str and child.startswith(_HOLE_MARK):
                value[index] = HoleRef(holes[int(child[len(_HOLE_MARK) :])][1])
    return value


@dataclass(frozen=True, slots=True)
class HoleRef:
    digest: bytes


def loads(text: bytes, flavor: int) -> Any:
    if flavor == CANONICAL:
        return orjson.loads(text)
    return json.loads(text)
