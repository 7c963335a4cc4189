"""`loraplex serve` settings from flags and LORAPLEX_* environment variables."""

from __future__ import annotations

import pytest

from server.cli import build_parser
from server.options import server_config


def test_serve_flags_default_to_their_loraplex_environment_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LORAPLEX_MAX_WAITING", "7")
    monkeypatch.setenv("LORAPLEX_API_KEY", "from-env")
    monkeypatch.setenv("LORAPLEX_ADAPTER_ROOTS", "/a:/b")
    args = build_parser().parse_args(["serve"])
    assert (args.max_waiting, args.api_key, args.adapter_roots) == (7, "from-env", ["/a", "/b"])


def test_a_flag_overrides_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_MAX_WAITING", "7")
    assert build_parser().parse_args(["serve", "--max-waiting", "9"]).max_waiting == 9


def test_an_empty_environment_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # docker-compose passes `LORAPLEX_API_KEY: ${LORAPLEX_API_KEY:-}`; an empty key must not
    # become a key that locks every route.
    monkeypatch.setenv("LORAPLEX_API_KEY", "")
    monkeypatch.setenv("LORAPLEX_MAX_WAITING", "")
    args = build_parser().parse_args(["serve"])
    assert (args.api_key, args.max_waiting) == (None, 1024)


def test_the_metrics_port_and_allowed_hosts_come_from_flags_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LORAPLEX_ALLOWED_HOSTS", "localhost:127.0.0.1")
    monkeypatch.setenv("LORAPLEX_METRICS_PORT", "9100")
    args = build_parser().parse_args(["serve"])
    assert (args.metrics_port, args.allowed_hosts) == (9100, ["localhost", "127.0.0.1"])
    args = build_parser().parse_args(["serve", "--allowed-hosts", "*.example.com"])
    assert args.allowed_hosts == ["*.example.com"]


def test_trusted_origins_are_comma_separated_in_the_flag_and_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    origins = ("https://tool.example:8443", "http://localhost:3000")
    monkeypatch.setenv("LORAPLEX_CSRF_TRUSTED_ORIGINS", ",".join(origins))
    assert server_config(build_parser().parse_args(["serve"])).csrf_trusted_origins == origins
    args = build_parser().parse_args(["serve", "--csrf-trusted-origins", "https://a.b, http://c:1"])
    assert server_config(args).csrf_trusted_origins == ("https://a.b", "http://c:1")
