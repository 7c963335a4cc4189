"""What clients see of server-side failures: the problem, never a server path or traceback."""

from __future__ import annotations

import logging
import re

import pytest

from adapters import AdapterError
from server.api.errors import InternalError, translate, without_paths
from server.engine.async_engine import EngineStepError


def test_an_adapter_error_names_the_folder_but_not_where_it_lives() -> None:
    err = translate(
        AdapterError("/srv/loraplex/data/adapters/.staging/x1 has no adapter_config.json")
    )
    assert (err.status, err.message) == (400, "x1 has no adapter_config.json")


def test_a_failed_step_does_not_show_the_file_it_failed_on() -> None:
    exc = EngineStepError("engine step failed: [Errno 2] No such file: '/var/lib/w/a.safetensors'")
    assert translate(exc).message == "engine step failed: [Errno 2] No such file: 'a.safetensors'"


def test_urls_and_relative_paths_are_left_alone() -> None:
    text = "see https://example.org/docs/a and adapters/x.json"
    assert without_paths(text) == text


def test_an_unexpected_error_is_a_generic_500_whose_id_is_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="server.api.errors"):
        err = translate(KeyError("/home/op/secret/config.toml"))
    assert isinstance(err, InternalError) and err.status == 500
    match = re.fullmatch(
        r"internal server error \(id (\w+); the server log has the details\)", err.message
    )
    assert match is not None
    assert "secret" not in err.message and "KeyError" not in err.message
    record = next(r for r in caplog.records if match.group(1) in r.getMessage())
    assert record.exc_info is not None  # the traceback stays in the log
