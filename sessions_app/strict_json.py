"""Strict reading of client input, shared by the API, the dashboard and the state store: JSON
integers past 64 bits, keys written twice in one object, and numbers written in digits."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from sessions_app.errors import InvalidState

# orjson reads integers beyond 64 bits as floats, silently changing the value. Such a literal needs
# a run of at least 19 digits, so only then is the text parsed again, exactly, to check.
LONG_DIGIT_RUN = re.compile(rb"\d{19}")


ASCII_DIGITS = re.compile(r"[0-9]{1,18}")


def ascii_int(raw: str) -> int | None:
    """The number `raw` writes in ASCII digits (at most 18, so it fits a bigint), else None.
    str.isdigit() is not enough: it accepts "²", which int() then refuses."""
    return int(raw) if ASCII_DIGITS.fullmatch(raw) else None


def _check_int(literal: str) -> int:
    number = int(literal)
    if not -(2**63) <= number < 2**64:
        raise InvalidState(f"integer {literal[:30]}... is outside the 64-bit range a state can hold exactly")
    return number


def refuse_huge_integers(raw: bytes | str) -> None:
    """InvalidState if JSON text holds an integer literal outside the signed/unsigned 64-bit range."""
    data = raw.encode() if isinstance(raw, str) else raw
    if LONG_DIGIT_RUN.search(data):
        try:
            json.loads(data, parse_int=_check_int)
        except RecursionError:  # the standard library's parser recurses; orjson accepted deeper text
            raise InvalidState("JSON is nested too deeply to check its integers (about 1,000 levels or more)") from None


class _Twice(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _once_each(pairs: list[tuple[str, Any]]) -> None:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Twice(next(key for index, key in enumerate(keys) if key in keys[:index]))


_NOT_PARSED = object()


def may_repeat_a_key(raw: bytes, value: Any) -> bool:
    """False only if no object of JSON text `raw` (which orjson parsed to `value`) names a key twice,
    told at C speed. Either `value` encodes back to `raw` itself (the compact JSON clients send), or
    `raw` holds as many colons as that encoding: outside strings a colon only ever follows a key, and a
    string's colons survive parsing unchanged (unless escaped as \\u003a: such text is doubtful), so
    each member a parser drops takes at least its own colon with it. Timed: 0.02 ms for a 200 KB body
    that encodes back to itself, 0.2 ms one that does not; the full second parse took 2-4 ms."""
    try:
        again = orjson.dumps(value)
    except orjson.JSONEncodeError:  # deeper than orjson writes (254 levels)
        return True
    if again == raw:
        return False
    return raw.count(b":") != again.count(b":") or b"\\u003" in raw


def refuse_duplicate_keys(raw: bytes | str, *, what: str, value: Any = _NOT_PARSED) -> None:
    """InvalidState naming a key written twice in one object of JSON text `raw` (parsed already,
    strictly): JSON parsers, orjson included, keep the last one's value and drop the other without a
    word, so a state would not read back as sent, and a repeated `expected_version` would go unchecked.
    Given `value` (orjson's parse of `raw`), the exact second parse runs only when may_repeat_a_key
    cannot rule a repeat out."""
    data = raw.encode() if isinstance(raw, str) else raw
    if value is not _NOT_PARSED and not may_repeat_a_key(data, value):
        return
    try:
        json.loads(data, object_pairs_hook=_once_each)
    except _Twice as twice:
        raise InvalidState(f"{what} has the key {json.dumps(twice.key)[:200]} twice in one object: JSON keeps only the "
                           "last one's value, so say each key once") from None
    except RecursionError:
        # The standard library's parser recurses; orjson accepted deeper text. The depth limits
        # (STATE_MAX_DEPTH, 200) refuse such text with a better message, naming the field.
        pass
