"""Errors raised for adapters that cannot be read, stored, or served."""

import reprlib

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 80, 80, 40


class AdapterError(ValueError):
    """An adapter artifact or request that is invalid; the message names the problem."""


class AdapterExistsError(AdapterError):
    """An adapter with this name is already registered."""


class AdapterNotFoundError(KeyError):
    """No adapter is registered under this name or id."""

    def __str__(self) -> str:
        # KeyError quotes its argument; the message should read as written.
        return str(self.args[0]) if self.args else ""


def short_repr(value: object) -> str:
    """repr(value) cut to a readable length, for echoing user input in an error message."""
    return _REPR.repr(value)
