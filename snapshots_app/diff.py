"""Diff two state trees, walking only where digests differ, so cost follows the change, not the state.

The result lists, per changed JSON path, what happened (added / removed / changed) with the old and
new values, and the same change as an RFC 6902 JSON Patch that turns the first state into the
second. A string holding JSON (LlamaIndex Workflows stores every value so) is compared as
structure: its changes carry `string_path` (the string's pointer) and `path` inside it, while the
patch replaces the whole string, since JSON Patch cannot address inside a string.

Pure code: nodes come from a `NodeSource` (see snapshots_app.store), values may be inline.
"""

from __future__ import annotations

import bisect
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from snapshots_app import tree
from snapshots_app.canonical import dumps as canonical_dumps
from snapshots_app.tree import CANONICAL, FLAVORS, PAGE, HoleRef, Node


class NodeSource(Protocol):
    def nodes(self, digests: set[bytes]) -> dict[bytes, Node]: ...


KIND_NAMES = {"add": "added", "remove": "removed", "replace": "changed"}


@dataclass
class DiffResult:
    changes: list[dict[str, Any]] = field(default_factory=list)
    patch: list[dict[str, Any]] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        counts = {"added": 0, "removed": 0, "changed": 0}
        for change in self.changes:
            counts[change["kind"]] += 1
        return counts


def pointer_token(key: str | int) -> str:
    key = str(key)
    if "~" not in key and "/" not in key:
        return key
    return key.replace("~", "~0").replace("/", "~1")


_MISSING = object()
_SCALAR = 0  # the kind of an inline value that is neither an object nor an array
# Short arrays are aligned on their longest common subsequence of equal items (a queue that popped
# two events and pushed two reads as two removals and two additions, not as every slot changed);
# past this many candidate matches, items are paired by position instead.
LCS_MAX_MATCHES = 4096
# What a step of the walk yields: a pair of differing children to diff next (a, b, path, string
# context, flavor); see _Walker.walk.
_Steps = Iterator[tuple[Any, Any, str, "_StringContext | None", int]]


class _Walker:
    """Walks two trees (or in-memory values) where they differ. Children are HoleRefs (a node of
    their own) or plain values (inline in their parent's text); nodes come from `source`."""

    def __init__(self, source: NodeSource, *, structural_strings: bool) -> None:
        self.source = source
        self.structural_strings = structural_strings
        self.cache: dict[bytes, Node] = {}
        self.parsed: dict[bytes, Any] = {}  # parse_node per digest, for this diff
        self.result = DiffResult()
        self.deferred: list[tuple[dict[str, Any], str]] = []  # (change or patch operation, key) to resolve

    # -- node access -------------------------------------------------------------------------------

    def prefetch(self, digests: Any) -> None:
        cache = self.cache
        wanted = {digest for digest in digests if digest not in cache}
        if wanted:
            fetched = self.source.nodes(wanted)
            if len(fetched) < len(wanted):
                raise tree.MissingNode(next(iter(wanted - fetched.keys())))
            cache.update(fetched)

    def prefetch_holes(self, children: Any) -> None:
        self.prefetch([child.digest for child in children if type(child) is HoleRef])

    def node(self, digest: bytes) -> Node:
        node = self.cache.get(digest)
        if node is None:
            self.prefetch((digest,))
            node = self.cache[digest]
        return node

    def _nodes(self, digests: set[bytes]) -> dict[bytes, Node]:
        self.prefetch(digests)
        return {digest: self.cache[digest] for digest in digests}

    def parse(self, digest: bytes) -> Any:
        """The node's own text as a value (holes as HoleRefs); read-only for the walk."""
        parsed = self.parsed.get(digest)
        if parsed is None:
            parsed = self.parsed[digest] = tree.parse_node(self.node(digest))
        return parsed

    def value(self, child: Any, flavor: int) -> Any:
        """A child as a value. A node with children is read once the walk is over (see resolve):
        all such values then come in one fetch per tree level, not a few round trips each."""
        if type(child) is not HoleRef:
            return child
        node = self.cache.get(child.digest)
        if node is not None and not node.children and node.kind != tree.KIND_JSON_STRING:
            return tree.loads(node.text, flavor)  # a leaf at hand: its text is the whole value
        return _Deferred(child.digest, flavor)

    def load(self, child: Any, flavor: int) -> Any:
        """A child's whole value, read now (its nodes a level per fetch)."""
        if type(child) is not HoleRef:
            return child
        tree.reachable({child.digest}, self._nodes)
        return tree.loads(tree.splice(child.digest, self.cache), flavor)

    def resolve(self) -> None:
        """Put the values of nodes with children (see value) into the changes and the patch."""
        targets = self.deferred
        if not targets:
            return
        # Everything below them, a level per fetch; what is at hand already is not asked for again.
        tree.reachable({entry[key].digest for entry, key in targets}, self._nodes)
        texts: dict[bytes, bytes] = {}
        values: dict[tuple[bytes, int], Any] = {}
        for entry, key in targets:
            deferred = entry[key]
            found = values.get((deferred.digest, deferred.flavor), _MISSING)
            if found is _MISSING:
                found = values[(deferred.digest, deferred.flavor)] = tree.loads(
                    tree.splice(deferred.digest, self.cache, texts), deferred.flavor
                )
            entry[key] = found

    # -- classification ----------------------------------------------------------------------------

    def kind_of(self, child: Any) -> int:
        kind = type(child)
        if kind is HoleRef:
            return self.node(child.digest).kind
        if kind is dict:
            return tree.KIND_OBJECT
        if kind is list:
            return tree.KIND_ARRAY
        return _SCALAR

    @staticmethod
    def same(a: Any, b: Any, flavor: int = CANONICAL) -> bool:
        # The hottest function of a diff: exact type checks, no isinstance.
        type_a, type_b = type(a), type(b)
        if type_a is HoleRef:
            if type_b is HoleRef:
                return bool(a.digest == b.digest)
            # One side is its own node, the other inline (a full run is stored whole, the run it
            # grew from item by item): a value has the same digest wherever it is stored.
            return tree.value_digest(b, flavor) == a.digest
        if type_b is HoleRef:
            return tree.value_digest(a, flavor) == b.digest
        if type_a is not type_b:
            return False
        if type_a is dict or type_a is list:
            # Python's == first: unequal there is unequal as JSON; equal there may still differ as
            # JSON (true vs 1, 1.0 vs 1 inside), which the canonical bytes settle.
            return bool(a == b) and canonical_dumps(a) == canonical_dumps(b)
        if type_a is float:
            return bool(a == b) and (a != 0.0 or math.copysign(1.0, a) == math.copysign(1.0, b))
        return bool(a == b)

    # -- emitting ----------------------------------------------------------------------------------

    def emit(self, op: str, path: str, old: Any, new: Any, ctx: _StringContext | None, flavor: int) -> None:
        change: dict[str, Any] = {"path": path, "op": op, "kind": KIND_NAMES[op]}
        if op != "add":
            change["old"] = value = self.value(old, flavor)
            if type(value) is _Deferred:
                self.deferred.append((change, "old"))
        if op != "remove":
            change["new"] = value = self.value(new, flavor)
            if type(value) is _Deferred:
                self.deferred.append((change, "new"))
        if ctx is not None:
            change["string_path"] = ctx.pointer
            ctx.touched = True
        elif op == "remove":
            self.result.patch.append({"op": op, "path": path})
        else:
            self.patch_value(path, change["new"], op)
        self.result.changes.append(change)

    def patch_value(self, path: str, value: Any, op: str = "replace") -> None:
        operation = {"op": op, "path": path, "value": value}
        if type(value) is _Deferred:
            self.deferred.append((operation, "value"))
        self.result.patch.append(operation)

    # -- walking -----------------------------------------------------------------------------------
    # Each step of the walk returns an iterator of the pairs of children (known to differ) to diff
    # before it goes on, and emits its own changes in between; `walk` runs the steps on a stack of
    # its own instead of Python's, so a state nested as deep as the store takes (and JSON inside
    # its strings, deeper still) diffs without RecursionError.

    def walk(self, a: Any, b: Any, path: str, ctx: _StringContext | None, flavor: int) -> None:
        if self.same(a, b, flavor):
            return
        stack = [self.diff_unequal(a, b, path, ctx, flavor)]
        while stack:
            pair = next(stack[-1], None)
            if pair is None:
                stack.pop()
            else:
                stack.append(self.diff_unequal(*pair))

    def diff_unequal(self, a: Any, b: Any, path: str, ctx: _StringContext | None, flavor: int) -> _Steps:
        kind_a, kind_b = self.kind_of(a), self.kind_of(b)
        if kind_a == kind_b == tree.KIND_OBJECT:
            return self.diff_objects(a, b, path, ctx, flavor)
        if kind_a == kind_b == tree.KIND_ARRAY:
            return self.diff_arrays(a, b, path, ctx, flavor)
        if ctx is None and self.structural_strings:
            inner_a = self._json_inner(a, kind_a)
            inner_b = self._json_inner(b, kind_b) if inner_a is not None else None
            if inner_a is not None and inner_b is not None:
                return self.diff_json_strings(a, b, inner_a, inner_b, path, flavor)
        self.emit("replace", path, a, b, ctx, flavor)
        return iter(())

    # Objects --------------------------------------------------------------------------------------

    def _members(self, child: Any) -> dict[str, Any]:
        if type(child) is not HoleRef:
            return child  # type: ignore[no-any-return]
        node = self.node(child.digest)
        if node.level == 0:
            return self.parse(child.digest)  # type: ignore[no-any-return]
        members: dict[str, Any] = {}
        for runs_members in self._member_runs([child.digest]):
            members.update(runs_members)
        return members

    def _member_runs(self, digests: list[bytes]) -> list[dict[str, Any]]:
        """The members of each member run under `digests` (runs of runs expanded)."""
        found = []
        pending = digests
        while pending:
            self.prefetch(pending)
            below: list[bytes] = []
            for digest in pending:
                node = self.cache[digest]
                if node.level == 0 and node.kind == tree.KIND_MEMBERS:
                    found.append(self.parse(digest))
                else:
                    below.extend(node.children)
            pending = below
        return found

    def diff_objects(self, a: Any, b: Any, path: str, ctx: _StringContext | None, flavor: int) -> _Steps:
        if type(a) is HoleRef and type(b) is HoleRef:
            node_a, node_b = self.node(a.digest), self.node(b.digest)
            if node_a.level > 0 or node_b.level > 0:
                # Member runs: drop the runs both sides share (same digest = same members), then
                # expand what remains; a key lives in exactly one run, so nothing is missed.
                return self._diff_member_maps(*self._differing_members(
                    [a.digest] if node_a.level == 0 else list(node_a.children),
                    [b.digest] if node_b.level == 0 else list(node_b.children),
                ), path, ctx, flavor)
        return self._diff_member_maps(self._members(a), self._members(b), path, ctx, flavor)

    def _differing_members(self, runs_a: list[bytes], runs_b: list[bytes]) -> tuple[dict, dict]:
        members_a: dict[str, Any] = {}
        members_b: dict[str, Any] = {}
        while runs_a or runs_b:
            common = set(runs_a) & set(runs_b)
            runs_a = [digest for digest in runs_a if digest not in common]
            runs_b = [digest for digest in runs_b if digest not in common]
            self.prefetch(runs_a + runs_b)
            next_a: list[bytes] = []
            next_b: list[bytes] = []
            for runs, members, below in ((runs_a, members_a, next_a), (runs_b, members_b, next_b)):
                for digest in runs:
                    node = self.cache[digest]
                    if node.level == 0:
                        members.update(self.parse(digest))
                    else:
                        below.extend(node.children)
            runs_a, runs_b = next_a, next_b
        return members_a, members_b

    def _diff_member_maps(
        self, members_a: dict[str, Any], members_b: dict[str, Any], path: str, ctx: _StringContext | None, flavor: int
    ) -> _Steps:
        same = self.same
        get_b = members_b.get
        # Equal members are dropped before anything else is done for them (most are equal).
        differing = [
            key for key, child in members_a.items()
            if (other := get_b(key, _MISSING)) is _MISSING or not same(child, other, flavor)
        ]
        # b has keys a lacks iff it has more than the keys of a it shares (all of a but the removed).
        removed = sum(1 for key in differing if key not in members_b)
        if len(members_b) > len(members_a) - removed:
            differing += [key for key in members_b if key not in members_a]
        if not differing:
            return
        differing.sort()
        self.prefetch_holes([members_a.get(key) for key in differing] + [get_b(key) for key in differing])
        for key in differing:
            child_path = f"{path}/{pointer_token(key)}"
            if key not in members_b:
                self.emit("remove", child_path, members_a[key], None, ctx, flavor)
            elif key not in members_a:
                self.emit("add", child_path, None, members_b[key], ctx, flavor)
            else:
                yield members_a[key], members_b[key], child_path, ctx, flavor

    # Arrays ---------------------------------------------------------------------------------------
    # A long array is paged: runs of PAGE items, runs of PAGE runs above them (tree._paged). Runs sit
    # at fixed indices, so two arrays of one length are compared run by run, skipping the runs they
    # share unread. Otherwise an insertion or a removal shifts every later item into other runs:
    # past the leading runs both share, the items are matched as a short array's are.

    def _level(self, side: Any) -> int:
        return self.node(side.digest).level if type(side) is HoleRef else 0

    def _items(self, side: Any) -> list[Any]:
        if type(side) is HoleRef:
            return self.parse(side.digest)  # type: ignore[no-any-return]
        return side  # type: ignore[no-any-return]

    def diff_arrays(self, a: Any, b: Any, path: str, ctx: _StringContext | None, flavor: int) -> _Steps:
        level_a, level_b = self._level(a), self._level(b)
        if level_a == level_b == 0:
            return self._diff_items(self._items(a), self._items(b), 0, path, ctx, flavor)
        if level_a > 0 and level_b > 0 and self._same_length(a, b):
            changed: list[tuple[int, Any, Any]] = []
            self._aligned(a, b, 0, changed, flavor)
            self.prefetch_holes([item for _, x, y in changed for item in (x, y)])
            return self._edits(changed, [], [], path, ctx, flavor)
        # Lengths differ, or one side is a single node (it grew or shrank past SPLIT_MIN).
        start, items_a, items_b = self._unshared_items(a, b)
        return self._diff_items(items_a, items_b, start, path, ctx, flavor)

    def _same_length(self, a: HoleRef, b: HoleRef) -> bool:
        """Whether two paged arrays hold as many items. Only the last run of each level may be part
        full, so this reads down the last runs, stopping where both sides share one."""
        difference = 0  # items of a counted so far, less those of b
        while a.digest != b.digest:
            self.prefetch((a.digest, b.digest))
            level_a, level_b = self._level(a), self._level(b)
            if level_a == level_b == 0:
                return difference + len(self._items(a)) == len(self._items(b))
            # Every run but the last holds PAGE**level items (the last may be of a lower level).
            if level_a >= level_b:
                runs = self.node(a.digest).children
                difference += (len(runs) - 1) * PAGE**level_a
                a = HoleRef(runs[-1])
            if level_b >= level_a:
                runs = self.node(b.digest).children
                difference -= (len(runs) - 1) * PAGE**level_b
                b = HoleRef(runs[-1])
        return difference == 0

    def _aligned(self, a: HoleRef, b: HoleRef, base: int, out: list[tuple[int, Any, Any]], flavor: int) -> None:
        """The differing items (index, a's, b's) of two arrays paged alike (of one length, so of one
        shape): only runs that differ are fetched; shared runs are skipped by digest alone."""
        level = self._level(a)
        if level == 0:
            same = self.same
            out += [
                (base + offset, item_a, item_b)
                for offset, (item_a, item_b) in enumerate(zip(self._items(a), self._items(b), strict=True))
                if not same(item_a, item_b, flavor)
            ]
            return
        span = PAGE**level
        pairs = [
            (index, run_a, run_b)
            for index, (run_a, run_b) in enumerate(zip(self.node(a.digest).children, self.node(b.digest).children, strict=True))
            if run_a != run_b
        ]
        self.prefetch([run for _, run_a, run_b in pairs for run in (run_a, run_b)])
        for index, run_a, run_b in pairs:
            self._aligned(HoleRef(run_a), HoleRef(run_b), base + index * span, out, flavor)

    def _unshared_items(self, a: Any, b: Any) -> tuple[int, list[Any], list[Any]]:
        """The index where the leading runs two arrays share end (same digest, so same items: they
        are not read), and the items of each from there on."""
        # Each side's runs still to compare, as a stack (next run last) of (run, index of its first
        # item). Both stacks' next runs start at the same index: skipped runs are equal on both sides.
        runs_a, runs_b = self._runs_of(a), self._runs_of(b)
        while runs_a and runs_b:
            run_a, run_b = runs_a[-1][0], runs_b[-1][0]
            if type(run_a) is HoleRef and type(run_b) is HoleRef and run_a.digest == run_b.digest:
                runs_a.pop()
                runs_b.pop()
                continue
            self.prefetch_holes((run_a, run_b))
            level_a, level_b = self._level(run_a), self._level(run_b)
            if level_a == level_b == 0:
                break
            # Open the higher run (or both) into its runs, to line them up with the other side's.
            for runs, level in ((runs_a, level_a), (runs_b, level_b)):
                if level == max(level_a, level_b):
                    run, start = runs.pop()
                    runs += self._runs_of(run, opened=True, start=start)
        start = (runs_a or runs_b)[-1][1] if runs_a or runs_b else 0
        return start, self._run_items(runs_a), self._run_items(runs_b)

    def _runs_of(self, side: Any, *, opened: bool = False, start: int = 0) -> list[tuple[Any, int]]:
        """A paged array's runs (or a run's, if `opened`) as a stack of (run, index of its first
        item); an array that is not paged is its own one run."""
        if not opened and self._level(side) == 0:
            return [(side, start)]
        node = self.node(side.digest)
        span = PAGE**node.level
        return [(HoleRef(run), start + index * span) for index, run in reversed(list(enumerate(node.children)))]

    def _run_items(self, runs: list[tuple[Any, int]]) -> list[Any]:
        """The items of a stack of runs, in order, fetched a level at a time."""
        pending = [run for run, _ in reversed(runs)]
        self.prefetch_holes(pending)
        while any(self._level(run) for run in pending):
            pending = [
                below for run in pending
                for below in ([HoleRef(child) for child in self.node(run.digest).children] if self._level(run) else [run])
            ]
            self.prefetch_holes(pending)
        items: list[Any] = []
        for run in pending:
            items += self._items(run)
        return items

    def _edits(
        self, changed: list[tuple[int, Any, Any]], removed: list[tuple[int, Any]], added: list[tuple[int, Any]],
        path: str, ctx: _StringContext | None, flavor: int,
    ) -> _Steps:
        """Array edits as a patch applies them in order: items changed in place (indices of the old
        array), then removals from the highest index down, then additions at their new indices."""
        for index, item_a, item_b in changed:
            if not self.same(item_a, item_b, flavor):
                yield item_a, item_b, f"{path}/{index}", ctx, flavor
        for index, item_a in reversed(removed):
            self.emit("remove", f"{path}/{index}", item_a, None, ctx, flavor)
        for index, item_b in added:
            self.emit("add", f"{path}/{index}", None, item_b, ctx, flavor)

    def _diff_items(
        self, items_a: list, items_b: list, base: int, path: str, ctx: _StringContext | None, flavor: int
    ) -> _Steps:
        """Two lists of items (an array's, or the tails of two arrays from index `base`)."""
        # Trim the common prefix and suffix so a queue pop or an insertion reads as one change.
        same = self.same
        prefix = 0
        limit = min(len(items_a), len(items_b))
        while prefix < limit and same(items_a[prefix], items_b[prefix], flavor):
            prefix += 1
        suffix = 0
        while suffix < limit - prefix and same(items_a[-1 - suffix], items_b[-1 - suffix], flavor):
            suffix += 1
        middle_a = items_a[prefix : len(items_a) - suffix]
        middle_b = items_b[prefix : len(items_b) - suffix]
        matches = self._common_items(middle_a, middle_b, flavor) if middle_a and middle_b else []
        changed: list[tuple[int, Any, Any]] = []
        removed: list[tuple[int, Any]] = []
        added: list[tuple[int, Any]] = []
        start_a = start_b = 0
        offset = base + prefix
        # Between two matched (equal) items, pair the unmatched ones by position (changed in
        # place); whatever is left over on one side was removed or added.
        for end_a, end_b in [*matches, (len(middle_a), len(middle_b))]:
            gap_a, gap_b = end_a - start_a, end_b - start_b
            paired = min(gap_a, gap_b)
            changed += [(offset + start_a + k, middle_a[start_a + k], middle_b[start_b + k]) for k in range(paired)]
            removed += [(offset + start_a + k, middle_a[start_a + k]) for k in range(paired, gap_a)]
            added += [(offset + start_b + k, middle_b[start_b + k]) for k in range(paired, gap_b)]
            start_a, start_b = end_a + 1, end_b + 1
        self.prefetch_holes([item for _, x, y in changed for item in (x, y)] + [x for _, x in removed + added])
        return self._edits(changed, removed, added, path, ctx, flavor)

    def _common_items(self, items_a: list, items_b: list, flavor: int) -> list[tuple[int, int]]:
        """A longest common subsequence of equal items, as (index in a, index in b) pairs."""
        if len(items_a) == 1 and len(items_b) == 1:
            return []  # (they differ: the prefix would have taken them)
        positions: dict[Any, list[int]] = {}
        for index, item in enumerate(items_b):
            positions.setdefault(_item_key(item, flavor), []).append(index)
        candidates: list[tuple[int, int]] = []  # (index in b, index in a), b descending per a item
        for index, item in enumerate(items_a):
            candidates += [(at, index) for at in reversed(positions.get(_item_key(item, flavor), ()))]
            if len(candidates) > LCS_MAX_MATCHES:
                return []
        # Longest strictly increasing run of b indices (patience sorting) = the longest common subsequence.
        tails: list[int] = []
        tail_at: list[int] = []
        previous = [-1] * len(candidates)
        for position, (at_b, _) in enumerate(candidates):
            slot = bisect.bisect_left(tails, at_b)
            if slot == len(tails):
                tails.append(at_b)
                tail_at.append(position)
            else:
                tails[slot] = at_b
                tail_at[slot] = position
            previous[position] = tail_at[slot - 1] if slot else -1
        matches = []
        position = tail_at[-1] if tail_at else -1
        while position >= 0:
            at_b, at_a = candidates[position]
            matches.append((at_a, at_b))
            position = previous[position]
        return matches[::-1]

    # JSON held in strings -------------------------------------------------------------------------

    def _json_inner(self, child: Any, kind: int) -> tuple[Any, int | None] | None:
        """(structure, its flavor if stored as a node) if the string child holds JSON we can walk:
        what the store would keep as structure (tree.json_text_value), however it is spelled."""
        if kind == tree.KIND_JSON_STRING:
            node = self.node(child.digest)
            return HoleRef(node.children[0]), node.level
        if type(child) is str and child[:1] in ("{", "["):
            try:
                return tree.json_text_value(child), None
            except ValueError:
                return None
        return None

    def diff_json_strings(
        self, a: Any, b: Any, inner_a: tuple[Any, int | None], inner_b: tuple[Any, int | None], path: str, flavor: int
    ) -> _Steps:
        (value_a, flavor_a), (value_b, flavor_b) = inner_a, inner_b
        if flavor_a is not None and flavor_b is not None and flavor_a != flavor_b:
            # Nodes of two flavors (an ensure_ascii=False writer's text is flavor 2 while it is all
            # ASCII, 4 once it is not) have different digests even where they mean the same:
            # compare the values themselves.
            value_a, value_b = self.load(value_a, flavor_a), self.load(value_b, flavor_b)
        # Walked in the flavor its nodes were written in (a string short enough to be inline is
        # compared as plain values).
        inner_flavor = flavor_a if flavor_a is not None else flavor_b if flavor_b is not None else CANONICAL
        ctx = _StringContext(path)
        before = len(self.result.changes)
        if not self.same(value_a, value_b, inner_flavor):
            yield value_a, value_b, "", ctx, inner_flavor
        if len(self.result.changes) == before:
            # Same structure, different spelling (whitespace, key order): report the string itself.
            self.emit("replace", path, a, b, None, flavor)
            return
        self.patch_value(path, self.value(b, flavor))


@dataclass(frozen=True, slots=True)
class _Deferred:
    """A value to read once the walk is over (see _Walker.resolve)."""

    digest: bytes
    flavor: int


@dataclass
class _StringContext:
    pointer: str
    touched: bool = False


def _item_key(item: Any, flavor: int) -> Any:
    """Equal keys for items `same` calls equal (a node's digest, or the value's own text)."""
    if type(item) is HoleRef:
        return item.digest
    text = FLAVORS[flavor].encode(item)
    if len(text) <= tree.INLINE_MAX:
        return (text,)  # a tuple: never equal to a digest
    return tree.value_digest(item, flavor, text)


def diff_trees(
    root_a: bytes, root_b: bytes, source: NodeSource, *, structural_strings: bool = True
) -> DiffResult:
    walker = _Walker(source, structural_strings=structural_strings)
    walker.walk(HoleRef(root_a), HoleRef(root_b), "", None, CANONICAL)
    walker.resolve()
    return walker.result


def diff_values(a: Any, b: Any, *, structural_strings: bool = True) -> DiffResult:
    """Diff two in-memory values with the same rules (used for unsaved edits, e.g. data fixes)."""
    walker = _Walker(_NoNodes(), structural_strings=structural_strings)
    walker.walk(a, b, "", None, CANONICAL)
    return walker.result


class _NoNodes:
    def nodes(self, digests: set[bytes]) -> dict[bytes, Node]:
        return {}


# --------------------------------------------------------------------------------------------------
# RFC 6902 application (add / remove / replace: the operations diffs produce; also test/move/copy)


class PatchError(ValueError):
    pass


def _parse_pointer(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise PatchError(f"JSON pointer must start with '/': {pointer!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in pointer[1:].split("/")]


def _resolve(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        if type(doc) is dict:
            if token not in doc:
                raise PatchError(f"path not found at {token!r}")
            doc = doc[token]
        elif type(doc) is list:
            doc = doc[_index(token, len(doc))]
        else:
            raise PatchError(f"cannot descend into a scalar at {token!r}")
    return doc


def value_at(doc: Any, pointer: str) -> Any:
    """The value at an RFC 6901 `pointer` (PatchError if there is none); strings are not entered."""
    return _resolve(doc, _parse_pointer(pointer))


def _index(token: str, length: int, *, allow_end: bool = False) -> int:
    if token == "-" and allow_end:
        return length
    if not (token.isascii() and token.isdigit()) or (token != "0" and token.startswith("0")):
        raise PatchError(f"bad array index {token!r}")
    index = int(token)
    if index > length or (index == length and not allow_end):
        raise PatchError(f"array index {index} out of range")
    return index


def json_copy(value: Any) -> Any:
    """A deep copy of a JSON value (orjson's round trip is ~10x copy.deepcopy; it refuses integers
    past 64 bits, which deepcopy takes)."""
    try:
        return orjson.loads(orjson.dumps(value))
    except TypeError:
        return copy.deepcopy(value)


def apply_patch(doc: Any, patch: list[dict[str, Any]], *, copy: Callable[[Any], Any] = json_copy) -> Any:
    """Apply a JSON Patch and return the new document (the input is not modified, unless `copy`
    gives it back as it is)."""
    doc = copy(doc)
    for operation in patch:
        op = operation.get("op")
        tokens = _parse_pointer(operation.get("path", ""))
        if op in ("move", "copy"):
            source_tokens = _parse_pointer(operation["from"])
            value = json_copy(_resolve(doc, source_tokens))
            if op == "move":
                doc = _apply_one(doc, "remove", source_tokens, None)
            doc = _apply_one(doc, "add", tokens, value)
        elif op == "test":
            if canonical_dumps(_resolve(doc, tokens)) != canonical_dumps(operation.get("value")):
                raise PatchError(f"test failed at {operation.get('path')!r}")
        elif op in ("add", "remove", "replace"):
            doc = _apply_one(doc, op, tokens, operation.get("value"))
        else:
            raise PatchError(f"unknown patch operation {op!r}")
    return doc


def _apply_one(doc: Any, op: str, tokens: list[str], value: Any) -> Any:
    if not tokens:
        if op == "remove":
            raise PatchError("cannot remove the whole document")
        return value
    parent = _resolve(doc, tokens[:-1])
    last = tokens[-1]
    if type(parent) is dict:
        if op in ("remove", "replace") and last not in parent:
            raise PatchError(f"path not found: {last!r}")
        if op == "remove":
            del parent[last]
        else:
            parent[last] = value
    elif type(parent) is list:
        if op == "add":
            parent.insert(_index(last, len(parent), allow_end=True), value)
        elif op == "remove":
            del parent[_index(last, len(parent))]
        else:
            parent[_index(last, len(parent))] = value
    else:
        raise PatchError("cannot apply an operation inside a scalar")
    return doc


__all__ = ["FLAVORS", "DiffResult", "PatchError", "apply_patch", "diff_trees", "diff_values", "value_at"]
