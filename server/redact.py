"""Server paths kept out of what clients see: API errors, job errors and job events."""

from __future__ import annotations

import re

# An absolute POSIX path of two or more parts (not inside a URL).
_SERVER_PATH = re.compile(r"(?<![\w.~:/])/(?:[^\s'\"/]+/)+[^\s'\"/]*")


def without_paths(message: str) -> str:
    """A message with each absolute server path cut to its last part (a file or folder name)."""
    return _SERVER_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], message)
