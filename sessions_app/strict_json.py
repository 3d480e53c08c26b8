"""Strict reading of client input, shared by the API, the dashboard and the state store: JSON
integers past 64 bits, and numbers written in digits."""

from __future__ import annotations

import json
import re

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
