"""Diff two state trees, walking only where digests differ, so cost follows the change, not the state.

The result lists, per changed JSON path, what happened (added / removed / changed) with the old and
new values, and the same change as an RFC 6902 JSON Patch that turns the first state into the
second. A string holding JSON (LlamaIndex Workflows stores every value so) is compared as
structure: its changes carry `string_path` (the string's pointer) and `path` inside it, while the
patch replaces the whole string, since JSON Patch cannot address inside a string.

Pure code: nodes come from a `NodeSource` (see snapshots_app.store), values may be inline.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from snapshots_app import tree
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


@dataclass(frozen=True, slots=True)
class Inline:
    value: Any


_MISSING = object()


class _Walker:
    def __init__(self, source: NodeSource, *, structural_strings: bool) -> None:
        self.source = source
        self.structural_strings = structural_strings
        self.cache: dict[bytes, Node] = {}
        self.result = DiffResult()

    # -- node access -------------------------------------------------------------------------------

    def prefetch(self, digests: set[bytes]) -> None:
        wanted = {d for d in digests if d not in self.cache}
        if wanted:
            fetched = self.source.nodes(wanted)
            missing = wanted - fetched.keys()
            if missing:
                raise tree.MissingNode(next(iter(missing)))
            self.cache.update(fetched)

    def node(self, digest: bytes) -> Node:
        if digest not in self.cache:
            self.prefetch({digest})
        return self.cache[digest]

    def value(self, child: Any, flavor: int) -> Any:
        kind = type(child)
        if kind is HoleRef:
            return tree.loads(tree.assemble(child.digest, self._fetch_all)[0], flavor)
        return child.value if kind is Inline else child

    def _fetch_all(self, digests: set[bytes]) -> dict[bytes, Node]:
        self.prefetch(digests)
        return {d: self.cache[d] for d in digests}

    # -- classification ----------------------------------------------------------------------------

    def shape(self, child: Any) -> str:
        if type(child) is HoleRef:
            kind = self.node(child.digest).kind
            if kind == tree.KIND_OBJECT:
                return "object"
            if kind == tree.KIND_ARRAY:
                return "array"
            if kind == tree.KIND_JSON_STRING:
                return "json-string"
            return "scalar"
        value = child.value if type(child) is Inline else child
        if type(value) is dict:
            return "object"
        if type(value) is list:
            return "array"
        return "scalar"

    @staticmethod
    def same(a: Any, b: Any, flavor: int = CANONICAL) -> bool:
        # The hottest function of a diff: exact type checks, no isinstance.
        type_a, type_b = type(a), type(b)
        if type_a is HoleRef:
            if type_b is HoleRef:
                return bool(a.digest == b.digest)
            # One side is its own node, the other inline (a full run is stored whole, the run it
            # grew from item by item): a value has the same digest wherever it is stored.
            return _digest_of_value(b.value if type_b is Inline else b, flavor) == a.digest
        if type_b is HoleRef:
            return _digest_of_value(a.value if type_a is Inline else a, flavor) == b.digest
        va = a.value if type_a is Inline else a
        vb = b.value if type_b is Inline else b
        kind = type(va)
        if kind is not type(vb):
            return False
        if kind is dict or kind is list:
            return orjson.dumps(va, option=orjson.OPT_SORT_KEYS) == orjson.dumps(vb, option=orjson.OPT_SORT_KEYS)
        return bool(va == vb)

    # -- emitting ----------------------------------------------------------------------------------

    def emit(self, op: str, path: str, old: Any, new: Any, ctx: _StringContext | None, flavor: int) -> None:
        change: dict[str, Any] = {"path": path, "op": op, "kind": KIND_NAMES[op]}
        if op != "add":
            change["old"] = self.value(old, flavor)
        if op != "remove":
            change["new"] = self.value(new, flavor)
        if ctx is not None:
            change["string_path"] = ctx.pointer
            ctx.touched = True
        else:
            patch_op: dict[str, Any] = {"op": op, "path": path}
            if op != "remove":
                patch_op["value"] = change["new"]
            self.result.patch.append(patch_op)
        self.result.changes.append(change)

    # -- walking -----------------------------------------------------------------------------------

    def diff(self, a: Any, b: Any, path: str, ctx: _StringContext | None, flavor: int) -> None:
        if not self.same(a, b, flavor):
            self.diff_unequal(a, b, path, ctx, flavor)

    def diff_unequal(self, a: Any, b: Any, path: str, ctx: _StringContext | None, flavor: int) -> None:
        shape_a, shape_b = self.shape(a), self.shape(b)
        if shape_a == shape_b == "object":
            self.diff_objects(a, b, path, ctx, flavor)
        elif shape_a == shape_b == "array":
            self.diff_arrays(a, b, path, ctx, flavor)
        elif ctx is None and self.structural_strings and self._both_json_strings(a, b, shape_a, shape_b):
            self.diff_json_strings(a, b, path, flavor)
        else:
            self.emit("replace", path, a, b, ctx, flavor)

    def _members(self, child: Any) -> dict[str, Any]:
        if isinstance(child, HoleRef):
            node = self.node(child.digest)
            if node.level == 0:
                return tree.parse_node(node)
            return self._run_members([child.digest])
        # Inline values need no wrapping: only parse_node makes HoleRefs (read-only from here on).
        return child.value if type(child) is Inline else child

    def _run_members(self, digests: list[bytes]) -> dict[str, Any]:
        members: dict[str, Any] = {}
        pending = list(digests)
        while pending:
            self.prefetch(set(pending))
            nxt = []
            for digest in pending:
                node = self.cache[digest]
                if node.level == 0 and node.kind == tree.KIND_MEMBERS:
                    members.update(tree.parse_node(node))
                else:
                    nxt.extend(node.children)
            pending = nxt
        return members

    def diff_objects(self, a: Any, b: Any, path: str, ctx: _StringContext | None, flavor: int) -> None:
        if isinstance(a, HoleRef) and isinstance(b, HoleRef):
            node_a, node_b = self.node(a.digest), self.node(b.digest)
            if node_a.level > 0 or node_b.level > 0:
                # Member runs: drop the runs both sides share (same digest = same members), then
                # expand what remains; a key lives in exactly one run, so nothing is missed.
                runs_a = [a.digest] if node_a.level == 0 else node_a.children
                runs_b = [b.digest] if node_b.level == 0 else node_b.children
                members_a, members_b = self._differing_members(runs_a, runs_b)
                self._diff_member_maps(members_a, members_b, path, ctx, flavor)
                return
        self._diff_member_maps(self._members(a), self._members(b), path, ctx, flavor)

    def _differing_members(self, runs_a: list[bytes], runs_b: list[bytes]) -> tuple[dict, dict]:
        members_a: dict[str, Any] = {}
        members_b: dict[str, Any] = {}
        while runs_a or runs_b:
            common = set(runs_a) & set(runs_b)
            runs_a = [d for d in runs_a if d not in common]
            runs_b = [d for d in runs_b if d not in common]
            self.prefetch(set(runs_a) | set(runs_b))
            next_a: list[bytes] = []
            next_b: list[bytes] = []
            for runs, members, nxt in ((runs_a, members_a, next_a), (runs_b, members_b, next_b)):
                for digest in runs:
                    node = self.cache[digest]
                    if node.level == 0:
                        members.update(tree.parse_node(node))
                    else:
                        nxt.extend(node.children)
            runs_a, runs_b = next_a, next_b
        return members_a, members_b

    def _diff_member_maps(
        self, members_a: dict[str, Any], members_b: dict[str, Any], path: str, ctx: _StringContext | None, flavor: int
    ) -> None:
        same = self.same
        # Equal members are dropped before anything else is done for them (most are equal).
        differing = [
            key for key, child in members_a.items() if key not in members_b or not same(child, members_b[key], flavor)
        ]
        differing += [key for key in members_b if key not in members_a]
        if not differing:
            return
        differing.sort()
        self.prefetch({
            child.digest for key in differing for child in (members_a.get(key), members_b.get(key))
            if type(child) is HoleRef
        })
        for key in differing:
            child_path = f"{path}/{pointer_token(key)}"
            if key not in members_b:
                self.emit("remove", child_path, members_a[key], None, ctx, flavor)
            elif key not in members_a:
                self.emit("add", child_path, None, members_b[key], ctx, flavor)
            else:
                self.diff_unequal(members_a[key], members_b[key], child_path, ctx, flavor)

    # Arrays ---------------------------------------------------------------------------------------

    def _level(self, side: Any) -> int:
        if isinstance(side, HoleRef):
            return self.node(side.digest).level
        return 0

    def _items(self, side: Any) -> list[Any]:
        if side is None:
            return []
        if isinstance(side, HoleRef):
            return tree.parse_node(self.node(side.digest))
        return side.value if type(side) is Inline else side

    def _children(self, side: Any) -> list[Any]:
        return [HoleRef(d) for d in self.node(side.digest).children]

    def _aligned(self, a: Any, b: Any, base: int, out: list[tuple[int, Any, Any]], flavor: int) -> None:
        """Index-aligned differing items of two (possibly paged) arrays, skipping shared runs."""
        if a is not None and b is not None and self.same(a, b, flavor):
            return
        level_a = self._level(a) if a is not None else -1
        level_b = self._level(b) if b is not None else -1
        level = max(level_a, level_b)
        if level <= 0:
            items_a, items_b = self._items(a), self._items(b)
            for offset in range(max(len(items_a), len(items_b))):
                item_a = items_a[offset] if offset < len(items_a) else _MISSING
                item_b = items_b[offset] if offset < len(items_b) else _MISSING
                if item_a is _MISSING or item_b is _MISSING or not self.same(item_a, item_b, flavor):
                    out.append((base + offset, item_a, item_b))
            return
        # A lower-level side covers only the first child slot of the higher-level one.
        children_a = self._children(a) if level_a == level else ([a] if a is not None else [])
        children_b = self._children(b) if level_b == level else ([b] if b is not None else [])
        span = PAGE**level
        pairs = []
        for index in range(max(len(children_a), len(children_b))):
            child_a = children_a[index] if index < len(children_a) else None
            child_b = children_b[index] if index < len(children_b) else None
            if child_a is None or child_b is None or not self.same(child_a, child_b, flavor):
                pairs.append((index, child_a, child_b))
        # Only runs that differ are fetched; shared runs are skipped by digest alone.
        self.prefetch({c.digest for _, x, y in pairs for c in (x, y) if isinstance(c, HoleRef)})
        for index, child_a, child_b in pairs:
            self._aligned(child_a, child_b, base + index * span, out, flavor)

    def diff_arrays(self, a: Any, b: Any, path: str, ctx: _StringContext | None, flavor: int) -> None:
        if self._level(a) == 0 and self._level(b) == 0:
            self._diff_short_arrays(self._items(a), self._items(b), path, ctx, flavor)
            return
        aligned: list[tuple[int, Any, Any]] = []
        self._aligned(a, b, 0, aligned, flavor)
        self._emit_aligned(aligned, path, ctx, flavor)

    def _emit_aligned(self, aligned: list[tuple[int, Any, Any]], path: str, ctx: _StringContext | None, flavor: int) -> None:
        self.prefetch({c.digest for _, x, y in aligned for c in (x, y) if isinstance(c, HoleRef)})
        removed = []
        for index, item_a, item_b in aligned:
            if item_a is not _MISSING and item_b is not _MISSING:
                self.diff(item_a, item_b, f"{path}/{index}", ctx, flavor)
            elif item_b is _MISSING:
                removed.append((index, item_a))
        # Removals run from the end so each index is still valid when its operation applies.
        for index, item_a in reversed(removed):
            self.emit("remove", f"{path}/{index}", item_a, None, ctx, flavor)
        for index, item_a, item_b in aligned:
            if item_a is _MISSING:
                self.emit("add", f"{path}/{index}", None, item_b, ctx, flavor)

    def _diff_short_arrays(self, items_a: list, items_b: list, path: str, ctx: _StringContext | None, flavor: int) -> None:
        # Trim the common prefix and suffix so a queue pop or an insertion reads as one change.
        prefix = 0
        limit = min(len(items_a), len(items_b))
        while prefix < limit and self.same(items_a[prefix], items_b[prefix], flavor):
            prefix += 1
        suffix = 0
        while suffix < limit - prefix and self.same(items_a[-1 - suffix], items_b[-1 - suffix], flavor):
            suffix += 1
        middle_a = items_a[prefix : len(items_a) - suffix]
        middle_b = items_b[prefix : len(items_b) - suffix]
        aligned = []
        for offset in range(max(len(middle_a), len(middle_b))):
            item_a = middle_a[offset] if offset < len(middle_a) else _MISSING
            item_b = middle_b[offset] if offset < len(middle_b) else _MISSING
            aligned.append((prefix + offset, item_a, item_b))
        self._emit_aligned(aligned, path, ctx, flavor)

    # JSON held in strings -------------------------------------------------------------------------

    def _json_string_parts(self, child: Any, shape: str) -> tuple[Any, int] | None:
        """(structure, inner flavor) if the string child holds JSON we can walk."""
        if shape == "json-string":
            node = self.node(child.digest)
            return HoleRef(node.children[0]), node.level
        value = child.value if isinstance(child, Inline) else child
        if isinstance(child, HoleRef):
            return None
        if type(value) is str and value[:1] in ("{", "["):
            try:
                return Inline(json.loads(value)), 1
            except ValueError:
                return None
        return None

    def _both_json_strings(self, a: Any, b: Any, shape_a: str, shape_b: str) -> bool:
        return self._json_string_parts(a, shape_a) is not None and self._json_string_parts(b, shape_b) is not None

    def diff_json_strings(self, a: Any, b: Any, path: str, flavor: int) -> None:
        inner_a, flavor_a = self._json_string_parts(a, self.shape(a))  # type: ignore[misc]
        inner_b, _flavor_b = self._json_string_parts(b, self.shape(b))  # type: ignore[misc]
        ctx = _StringContext(path)
        before = len(self.result.changes)
        self.diff(inner_a, inner_b, "", ctx, flavor_a if isinstance(inner_a, HoleRef) else CANONICAL)
        if len(self.result.changes) == before:
            # Same structure, different spelling (whitespace, key order): report the string itself.
            self.emit("replace", path, a, b, None, flavor)
            return
        self.result.patch.append({"op": "replace", "path": path, "value": self.value(b, flavor)})


@dataclass
class _StringContext:
    pointer: str
    touched: bool = False


def _digest_of_value(value: Any, flavor: int) -> bytes:
    """The digest a value would be stored under as a node of its own (see tree.TreeWriter._piece)."""
    return tree.digest_of(tree.node_kind(value), flavor, FLAVORS[flavor].encode(value))


def diff_trees(
    root_a: bytes, root_b: bytes, source: NodeSource, *, structural_strings: bool = True
) -> DiffResult:
    walker = _Walker(source, structural_strings=structural_strings)
    walker.diff(HoleRef(root_a), HoleRef(root_b), "", None, CANONICAL)
    return walker.result


def diff_values(a: Any, b: Any, *, structural_strings: bool = True) -> DiffResult:
    """Diff two in-memory values with the same rules (used for unsaved edits, e.g. data fixes)."""
    walker = _Walker(_NoNodes(), structural_strings=structural_strings)
    walker.diff(Inline(a), Inline(b), "", None, CANONICAL)
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


def _index(token: str, length: int, *, allow_end: bool = False) -> int:
    if token == "-" and allow_end:
        return length
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise PatchError(f"bad array index {token!r}")
    index = int(token)
    if index > length or (index == length and not allow_end):
        raise PatchError(f"array index {index} out of range")
    return index


def apply_patch(doc: Any, patch: list[dict[str, Any]], *, copy: Callable[[Any], Any] | None = None) -> Any:
    """Apply a JSON Patch and return the new document (the input is not modified)."""
    doc = orjson.loads(orjson.dumps(doc)) if copy is None else copy(doc)
    for operation in patch:
        op = operation.get("op")
        tokens = _parse_pointer(operation.get("path", ""))
        if op in ("move", "copy"):
            source_tokens = _parse_pointer(operation["from"])
            value = orjson.loads(orjson.dumps(_resolve(doc, source_tokens)))
            if op == "move":
                doc = _apply_one(doc, "remove", source_tokens, None)
            doc = _apply_one(doc, "add", tokens, value)
        elif op == "test":
            if orjson.dumps(_resolve(doc, tokens), option=orjson.OPT_SORT_KEYS) != orjson.dumps(
                operation.get("value"), option=orjson.OPT_SORT_KEYS
            ):
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


__all__ = ["FLAVORS", "DiffResult", "PatchError", "apply_patch", "diff_trees", "diff_values"]
