"""Pure helpers the dashboard uses to show states and diffs: JSON pointers (also into JSON held in
strings), one tree level at a time, key/value search, and line/word diffs of long strings.

No database here; views hand in already verified, parsed states.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from snapshots_app.diff import pointer_token

LEVEL_PAGE = 200
PREVIEW_CHARS = 160
LONG_STRING = 80
SEARCH_LIMIT = 200
SEARCH_BUDGET = 400_000  # nodes visited at most: keeps a search on a 5 MB state well under a second


class PointerError(LookupError):
    pass


def parse_pointer(pointer: str) -> list[str]:
    """RFC 6901, as the diff's paths are: "" is the whole state and "/" its key "" (an engine's empty
    key: read as the whole state, its diff row's history and its viewer node showed the root instead)."""
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise PointerError(f"a JSON pointer starts with '/': {pointer!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in pointer[1:].split("/")]


def join_pointer(pointer: str, key: str | int) -> str:
    return f"{pointer}/{pointer_token(key)}"


def json_inside(value: Any) -> Any | None:
    """The structure a string holds, if it is JSON text of an object or array (engines store so)."""
    if type(value) is not str or value[:1] not in ("{", "["):
        return None
    try:
        inner = json.loads(value)
    except ValueError:
        return None
    return inner if isinstance(inner, (dict, list)) else None


def resolve(document: Any, pointer: str) -> Any:
    """The value at `pointer`; a token continuing past a JSON-holding string descends into its JSON."""
    value = document
    for token in parse_pointer(pointer):
        if type(value) is str:
            inner = json_inside(value)
            if inner is None:
                raise PointerError(f"no {token!r} inside a string")
            value = inner
        if type(value) is dict:
            if token not in value:
                raise PointerError(f"no key {token!r}")
            value = value[token]
        elif type(value) is list:
            # isascii(): str.isdigit() also accepts "²", which int() refuses.
            if not (token.isascii() and token.isdigit()) or int(token) >= len(value):
                raise PointerError(f"no index {token!r}")
            value = value[int(token)]
        else:
            raise PointerError(f"cannot descend into a scalar at {token!r}")
    return value


@dataclass(frozen=True)
class Entry:
    """One child shown in a tree level."""

    key: str
    pointer: str
    kind: str  # object | array | json-string | string | number | boolean | null
    preview: str
    size: int  # members / items for containers, characters for strings
    truncated: bool = False

    @property
    def expandable(self) -> bool:
        return self.kind in ("object", "array", "json-string")


def kind_of(value: Any) -> str:
    if type(value) is dict:
        return "object"
    if type(value) is list:
        return "array"
    if type(value) is str:
        return "json-string" if json_inside(value) is not None else "string"
    if type(value) is bool:
        return "boolean"
    if value is None:
        return "null"
    return "number"


def preview(value: Any) -> tuple[str, bool]:
    """A short text for a value (the template escapes it) and whether it was cut."""
    if type(value) is dict:
        return f"{{{len(value)} {'key' if len(value) == 1 else 'keys'}}}", False
    if type(value) is list:
        return f"[{len(value)} {'item' if len(value) == 1 else 'items'}]", False
    if type(value) is str:
        text = json.dumps(value, ensure_ascii=False)
        return (text[:PREVIEW_CHARS] + "…", True) if len(text) > PREVIEW_CHARS else (text, False)
    return json.dumps(value), False


def level(value: Any, pointer: str, *, offset: int = 0, limit: int = LEVEL_PAGE) -> tuple[list[Entry], int | None]:
    """The children of a container (or of the JSON a string holds), one page; and the next offset."""
    container = json_inside(value) if type(value) is str else value
    if type(container) is dict:
        items: list[tuple[str, Any]] = list(container.items())
    elif type(container) is list:
        items = [(str(index), item) for index, item in enumerate(container)]
    else:
        return [], None
    offset = max(offset, 0)  # a negative one would slice from the end
    entries = []
    for key, child in items[offset : offset + limit]:
        text, cut = preview(child)
        size = len(child) if isinstance(child, (dict, list, str)) else 0
        entries.append(Entry(key, join_pointer(pointer, key), kind_of(child), text, size, cut))
    following = offset + limit
    return entries, following if following < len(items) else None


def search(document: Any, query: str, *, limit: int = SEARCH_LIMIT) -> tuple[list[tuple[str, str]], bool]:
    """(pointer, matched text) of keys and scalar values containing `query` (case-insensitive), and
    whether the search stopped early. Walks iteratively: hostile nesting cannot blow the stack."""
    needle = query.casefold()
    found: list[tuple[str, str]] = []
    stack: list[tuple[str, Any]] = [("", document)]
    visited = 0
    while stack:
        visited += 1
        if len(found) >= limit or visited > SEARCH_BUDGET:
            return found, True
        pointer, value = stack.pop()
        if type(value) is dict:
            for key in reversed(list(value)):
                child_pointer = join_pointer(pointer, key)
                if needle in key.casefold():
                    found.append((child_pointer, key))
                stack.append((child_pointer, value[key]))
        elif type(value) is list:
            for index in range(len(value) - 1, -1, -1):
                stack.append((join_pointer(pointer, index), value[index]))
        else:
            text = value if type(value) is str else json.dumps(value)
            if needle in text.casefold():
                found.append((pointer or "/", preview(value)[0]))
    return found, False


def is_long_text(old: Any, new: Any) -> bool:
    if type(old) is not str or type(new) is not str:
        return False
    return len(old) > LONG_STRING or len(new) > LONG_STRING or "\n" in old + new


# difflib's matcher is quadratic in the pieces it compares: past this many (pieces of the old text
# times pieces of the new, after their common start and end are set aside) the differing middle is
# shown removed and added whole. A 10,000-word line with one word changed took ~30 s of a request;
# trimmed, it is that word. A middle at the cap takes well under a second (see tests).
TEXT_DIFF_MAX_WORK = 1_000_000
# What the word/line diffs of one page may do together: a diff page shows up to 500 changes, and 500
# long strings each just under TEXT_DIFF_MAX_WORK (600 rewritten 2.6 KB summaries) took 23-29 s of
# one request. Past this, further strings read as removed and added whole.
TEXT_DIFF_PAGE_WORK = 4_000_000
_WORD = re.compile(r"\s+|\S+")


class TextDiffBudget:
    """The matcher work (TEXT_DIFF_MAX_WORK's units) left to the text diffs of one page."""

    def __init__(self, work: int = TEXT_DIFF_PAGE_WORK) -> None:
        self.left = work


def text_diff(old: str, new: str, budget: TextDiffBudget | None = None) -> list[tuple[str, str]]:
    """(op, text) pieces: ' ' same, '-' removed, '+' added. By line when multi-line, else by word.
    With `budget`, the matcher's work is taken from it (shared by every text diff of a page)."""
    by_line = "\n" in old or "\n" in new
    if by_line:
        a, b = old.splitlines(keepends=True), new.splitlines(keepends=True)
    else:
        a, b = _WORD.findall(old), _WORD.findall(new)
    start = 0
    while start < len(a) and start < len(b) and a[start] == b[start]:
        start += 1
    end = 0
    while end < len(a) - start and end < len(b) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    middle_a, middle_b = a[start : len(a) - end], b[start : len(b) - end]
    pieces: list[tuple[str, str]] = [(" ", "".join(a[:start]))] if start else []
    work = len(middle_a) * len(middle_b)
    if work > TEXT_DIFF_MAX_WORK or (budget is not None and work > budget.left):
        pieces += [("-", "".join(middle_a)), ("+", "".join(middle_b))]
    else:
        if budget is not None:
            budget.left -= work
        opcodes = difflib.SequenceMatcher(a=middle_a, b=middle_b, autojunk=False).get_opcodes()
        # (By line, each changed line already reads next to its new one: paragraphs each edited a
        # little, kept only in their blank lines between, would have become two whole blocks.)
        if not by_line and _mostly_rewritten(middle_a, middle_b, opcodes):
            opcodes = [("replace", 0, len(middle_a), 0, len(middle_b))]
        for tag, i1, i2, j1, j2 in opcodes:
            if tag == "equal":
                pieces.append((" ", "".join(middle_a[i1:i2])))
                continue
            if i2 > i1:
                pieces.append(("-", "".join(middle_a[i1:i2])))
            if j2 > j1:
                pieces.append(("+", "".join(middle_b[j1:j2])))
    if end:
        pieces.append((" ", "".join(a[len(a) - end :])))
    return pieces


CONTEXT_LINES = 3  # unchanged lines shown next to a change in a text diff
CONTEXT_CHARS = 240  # unchanged characters shown next to a change in a word diff


def collapse_unchanged(pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """text_diff's pieces with each long unchanged run cut to the context next to the changes, the rest
    said in a ("…", "1,204 unchanged lines") piece: a 150 KB tool result changed at its end was shown
    whole, twice side by side (a page 44,000 px tall), to show a thousand characters. Lines where the
    text has them, else characters. The whole value is a click away (the version's state)."""
    collapsed: list[tuple[str, str]] = []
    for index, (op, text) in enumerate(pieces):
        first, last = index == 0, index == len(pieces) - 1
        if op != " ":
            collapsed.append((op, text))
            continue
        by_line = "\n" in text
        units: Sequence[str] = text.splitlines(keepends=True) if by_line else text  # lines, or characters
        keep = CONTEXT_LINES if by_line else CONTEXT_CHARS
        head = 0 if first else keep  # what follows the change before
        tail = 0 if last else keep  # what precedes the change after
        cut = len(units) - head - tail
        if cut <= keep:  # little to cut: shown whole
            collapsed.append((op, text))
            continue
        said = f"{cut:,} unchanged {'line' if by_line else 'character'}{'s' if cut != 1 else ''}"
        parts = [(" ", "".join(units[:head])), ("…", said), (" ", "".join(units[len(units) - tail:]))]
        collapsed += [part for part in parts if part[1]]
    return collapsed


def _mostly_rewritten(a: list[str], b: list[str], opcodes: Sequence[tuple[str, int, int, int, int]]) -> bool:
    """Whether less than half of the shorter side's text (spaces aside) is kept: a replaced tool
    result or a rewritten summary. Word by word, it read as the two texts shuffled together, the odd
    "the" or "about" kept between them; removed and added whole, each can be read."""
    kept = sum(len(piece.strip()) for tag, i1, i2, _, _ in opcodes if tag == "equal" for piece in a[i1:i2])
    shorter = min(sum(len(piece.strip()) for piece in a), sum(len(piece.strip()) for piece in b))
    return 2 * kept < shorter


# The characters of one string a version page shows at once: a 10 MB log was a 14 MB page that
# took its browser half a minute.
TEXT_PAGE = 100_000


@dataclass(frozen=True)
class TextPage:
    """One page of a string's characters: text[start:end] of `total`."""

    text: str
    start: int
    end: int
    total: int
    prev_offset: int | None
    next_offset: int | None


def text_page(text: str, offset: int = 0, *, size: int = TEXT_PAGE) -> TextPage:
    """The characters of `text` from `offset` (clamped to the text) on, at most `size` of them."""
    start = min(max(offset, 0), max(len(text) - 1, 0))
    end = min(start + size, len(text))
    return TextPage(
        text=text[start:end], start=start, end=end, total=len(text),
        prev_offset=max(start - size, 0) if start else None, next_offset=end if end < len(text) else None,
    )


def pretty(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True)
