"""Flags come from the config dataclasses: a field with help is a flag, an env var, a value."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest

from server.cli import build_parser
from server.config import EngineConfig, ServerConfig, option
from server.options import add_config_flags, config_from_args, env_name, server_config
from server.ray.cli import RayConfig


@dataclass
class Settings:
    """A config another helper might write tomorrow."""

    batch_limit: int = option(8, "most items per batch")
    ratio: float | None = option(None, "a share")
    name: str | None = option(None, "a name")
    mode: str = option("fast", "how to run", choices=("fast", "safe"))
    verbose: bool = option(False, "say more")
    cache: bool = option(True, "keep results")
    roots: tuple[str, ...] = option((), "where to look")
    origins: tuple[str, ...] = option((), "sites, comma-separated", sep=",")
    derived: int = 0  # no help: no flag


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Settings)
    return parser.parse_args(argv)


def test_a_field_with_help_is_all_it_takes_to_get_a_flag_and_its_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert config_from_args(Settings, parse([])) == Settings()
    argv = ["--batch-limit", "3", "--ratio", "0.5", "--name", "x", "--mode", "safe"]
    argv += ["--verbose", "--no-cache", "--roots", "/a", "/b"]
    argv += ["--origins", "https://a.example:8443, https://b.example"]
    got = config_from_args(Settings, parse(argv), derived=7)
    origins = ("https://a.example:8443", "https://b.example")
    assert got == Settings(3, 0.5, "x", "safe", True, False, ("/a", "/b"), origins, 7)
    monkeypatch.setenv("LORAPLEX_BATCH_LIMIT", "5")
    monkeypatch.setenv("LORAPLEX_VERBOSE", "yes")
    monkeypatch.setenv("LORAPLEX_ROOTS", "/c:/d")
    monkeypatch.setenv("LORAPLEX_ORIGINS", "http://c:1,http://d:2")
    got = config_from_args(Settings, parse([]))
    assert (got.batch_limit, got.verbose, got.roots) == (5, True, ("/c", "/d"))
    assert got.origins == ("http://c:1", "http://d:2")


def test_choices_and_types_are_checked_by_the_parser() -> None:
    with pytest.raises(SystemExit):
        parse(["--mode", "slow"])
    with pytest.raises(SystemExit):
        parse(["--batch-limit", "many"])


def test_an_empty_optional_value_means_none() -> None:
    assert config_from_args(Settings, parse(["--name", ""])).name is None


def test_a_field_without_help_has_no_flag() -> None:
    with pytest.raises(SystemExit):
        parse(["--derived", "1"])


@pytest.mark.parametrize("command", ["serve", "serve-ray"])
def test_every_engine_and_server_field_with_help_is_a_flag_with_its_environment_variable(
    command: str,
) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {
        opt: action.help
        for action in sub.choices[command]._actions
        for opt in action.option_strings
    }
    configs = [EngineConfig, ServerConfig] + ([RayConfig] if command == "serve-ray" else [])
    for cls in configs:
        for field in dataclasses.fields(cls):
            flag = "--" + field.name.replace("_", "-")
            if not field.metadata.get("help"):
                continue
            assert flag in flags, f"{cls.__name__}.{field.name} has no flag"
            assert flags[flag] == f"{field.metadata['help']} (env {env_name(flag)})"


def test_serve_defaults_are_the_dataclass_defaults() -> None:
    args = build_parser().parse_args(["serve", "--model", "/m"])
    assert server_config(args) == ServerConfig()
    assert config_from_args(EngineConfig, args) == EngineConfig(model="/m")


def test_the_training_memory_bound_is_one_flag_for_the_engine_and_the_jobs() -> None:
    args = build_parser().parse_args(["serve", "--model", "/m", "--training-memory-mb", "64"])
    engine = config_from_args(EngineConfig, args)
    assert (engine.training_memory_mb, server_config(args).training_memory_mb) == (64, 64)
