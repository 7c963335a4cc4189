"""Errors raised for adapters that cannot be read, stored, or served."""


class AdapterError(ValueError):
    """An adapter artifact or request that is invalid; the message names the problem."""


class AdapterExistsError(AdapterError):
    """An adapter with this name is already registered."""


class AdapterNotFoundError(KeyError):
    """No adapter is registered under this name or id."""

    def __str__(self) -> str:
        # KeyError quotes its argument; the message should read as written.
        return str(self.args[0]) if self.args else ""
