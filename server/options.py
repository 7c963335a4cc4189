"""Command-line flags generated from config dataclasses: one place per option.

Every dataclass field declared with `server.config.option(default, help)` becomes the flag
`--field-name` whose default comes from the environment variable `LORAPLEX_FIELD_NAME` when
set, and `config_from_args` builds the dataclass back from the parsed flags. The flag's kind
follows the field's type: `int`/`float` parse as such, `bool` is a switch (`--no-x` too when it
defaults to true), `tuple[str, ...]` takes any number of values (the environment variable
separates them with os.pathsep; with `sep` both take one string split there), and `X | None`
takes an X, an empty value meaning None.
Adding a field with help is all it takes to add a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

from server.config import EngineConfig, ServerConfig

C = TypeVar("C")


def env_name(flag: str) -> str:
    """LORAPLEX_<FLAG>: the environment variable a flag's default is read from."""
    return "LORAPLEX_" + flag.lstrip("-").replace("-", "_").upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    default: Any,
    help: str,
    **kw: Any,
) -> None:
    """A flag whose default comes from LORAPLEX_<FLAG> when set (argparse applies `type`)."""
    env = os.environ.get(env_name(flag))
    # An empty value counts as unset: compose files pass `LORAPLEX_API_KEY: ${KEY:-}`, and an
    # empty API key would otherwise lock every route.
    if env:
        if kw.get("nargs") == "*":
            default = [v for v in env.split(os.pathsep) if v]
        elif kw.get("action") in ("store_true", argparse.BooleanOptionalAction):
            default = env.lower() in ("1", "true", "yes", "on")
        else:
            default = env
    parser.add_argument(flag, default=default, help=f"{help} (env {env_name(flag)})", **kw)


def _flag_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of each field of cls declared with help, in declaration order."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("help")]


def _unwrap_optional(kind: Any) -> Any:
    """X for `X | None`, else kind itself."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        assert len(args) == 1, f"an option is one type or that type | None, got {kind}"
        return args[0]
    return kind


def _argparse_kwargs(field: dataclasses.Field, kind: Any) -> dict[str, Any]:
    base = _unwrap_optional(kind)
    if base is bool:
        action = argparse.BooleanOptionalAction if field.default else "store_true"
        return {"action": action}
    if typing.get_origin(base) is tuple:
        return {} if field.metadata.get("sep") else {"nargs": "*"}
    kw: dict[str, Any] = {}
    if base in (int, float):
        kw["type"] = base
    else:
        assert base is str, f"option {field.name}: unsupported type {kind}"
    if field.metadata.get("choices"):
        kw["choices"] = field.metadata["choices"]
    return kw


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One flag per field of the dataclass cls declared with help, in declaration order."""
    for field, kind in _flag_fields(cls):
        default = field.default
        if isinstance(default, tuple):
            sep = field.metadata.get("sep")
            default = sep.join(default) if sep else list(default)
        help = field.metadata["help"]
        add_flag(parser, flag_name(field.name), default, help, **_argparse_kwargs(field, kind))


def config_from_args(cls: type[C], args: argparse.Namespace, **fields: Any) -> C:
    """cls built from parsed flags (an empty string for an optional value meaning None);
    `fields` set what has no flag of its own, or replace a flag's value."""
    values: dict[str, Any] = {}
    for field, kind in _flag_fields(cls):
        value = getattr(args, field.name)
        if isinstance(value, list):
            value = tuple(value)
        elif sep := field.metadata.get("sep"):
            value = tuple(v.strip() for v in value.split(sep) if v.strip())
        elif value == "" and _unwrap_optional(kind) is not kind:
            value = None
        values[field.name] = value
    return cls(**{**values, **fields})


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `serve` (and `serve-ray`): the engine's, then the server's."""
    add_config_flags(parser.add_argument_group("engine"), EngineConfig)
    add_config_flags(parser.add_argument_group("server"), ServerConfig)


def serve_configs(args: argparse.Namespace) -> tuple[ServerConfig, EngineConfig]:
    """The server and engine settings of parsed `serve` flags."""
    return server_config(args), engine_config(args)


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The server settings of parsed `serve` flags."""
    # The engine's --training-memory-mb is also the most one job may use (0: no bound).
    return config_from_args(ServerConfig, args, training_memory_mb=args.training_memory_mb or None)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine settings of parsed `serve` flags, --model resolved to a Hugging Face
    directory (a GGUF file or the default model converted once into the cache)."""
    from server.model.resolve import resolve_model

    engine = config_from_args(EngineConfig, args, model=None)
    engine.model = str(resolve_model(args.model, engine.torch_dtype))
    return engine
