"""Errors the engine raises about requests and adapters, which the API turns into 400, 404
and 409."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine refuses before queuing it; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class UnknownAdapterError(InvalidRequestError):
    """A request names an adapter that is not registered."""


class AdapterVersionGoneError(InvalidRequestError):
    """A request prepared for one version of an adapter (its chat template) arrives after an
    in-place reload has replaced that version and freed it."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"adapter {name!r} was reloaded while this request was being prepared, and the "
            "version it was prepared for is gone; send the request again",
            "model",
        )


class AdapterBusyError(RuntimeError):
    """An adapter cannot be removed while requests use it."""

    def __init__(self, name: str, num_requests: int) -> None:
        super().__init__(
            f"adapter {name!r} is in use by {num_requests} request(s); retry when they finish"
        )
