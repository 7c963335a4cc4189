"""Bounds on what a user's regex and schema counts may ask of the grammar compilers.

Checked before a pattern reaches Python's `re` (which raises OverflowError past 2**32 - 1
repetitions and RecursionError a few hundred groups deep) or xgrammar (which wraps counts past
2**31 - 1 around, enforcing a different pattern than the one asked for). A count past
MAX_REPEAT is more output than any request can produce; nesting past MAX_GROUP_DEPTH serves no
real pattern.
"""

from __future__ import annotations

import re
from typing import Any

from server.engine.errors import InvalidRequestError

MAX_REPEAT = 1 << 20  # repetition counts ({m,n}) and schema lengths and item counts
MAX_GROUP_DEPTH = 64  # groups inside groups
_COUNT = re.compile(r"\{(\d*)(?:,(\d*))?\}")
_MAX_DIGITS = len(str(MAX_REPEAT))


def check_regex_bounds(pattern: str, where: str, param: str) -> None:
    """Refuse a regex with a repetition count over MAX_REPEAT or groups nested deeper than
    MAX_GROUP_DEPTH, naming `where`; one pass, no recursion."""
    depth = 0
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2  # an escaped character, whatever it is
            continue
        if char == "[":
            i = _class_end(pattern, i)
            continue
        if char == "(":
            depth += 1
            if depth > MAX_GROUP_DEPTH:
                raise InvalidRequestError(
                    f"{where} nests groups more than {MAX_GROUP_DEPTH} deep", param
                )
        elif char == ")":
            depth = max(0, depth - 1)
        elif char == "{" and (count := _COUNT.match(pattern, i)):
            for number in count.groups():
                if number and _too_many(number):
                    raise InvalidRequestError(
                        f"{where} repeats up to {_shown(number)} times; counts above "
                        f"{MAX_REPEAT} are not supported",
                        param,
                    )
            i = count.end()
            continue
        i += 1


def check_count(value: Any, where: str, param: str) -> None:
    """Refuse a schema length or item count that is not an integer in [0, MAX_REPEAT]."""
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if not ok or not 0 <= value <= MAX_REPEAT or value != int(value):
        raise InvalidRequestError(
            f"{where} must be an integer in [0, {MAX_REPEAT}], got {_shown(str(value))}", param
        )


def _class_end(pattern: str, start: int) -> int:
    """The index after the character class opened at `start` (a `]` first in it is literal)."""
    i = start + 1
    if pattern.startswith("^", i):
        i += 1
    if pattern.startswith("]", i):
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


def _too_many(digits: str) -> bool:
    # Compared by length first: int() refuses strings past 4300 digits.
    digits = digits.lstrip("0")
    return len(digits) > _MAX_DIGITS or int(digits or "0") > MAX_REPEAT


def _shown(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"
