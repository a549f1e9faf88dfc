"""nanoGPT's "poor man's configurator", kept compatible but strict.

A command line is a sequence of
    path/to/config.py   a Python file, executed; the names it assigns set config keys;
    --key=value         one key; the value is `ast.literal_eval`'d (a bare word that is not
                        a Python literal, like --device=cpu, stays a string);
applied left to right, later ones winning, exactly as nanoGPT's configurator.py. Unlike
nanoGPT, every mistake is a `ConfigError` naming it: an unknown key (in a file or an
override), a value whose type differs from the default's (an int is accepted where the
default is a float), a missing file. Config files may import modules and define helper
functions; only names that are not modules, functions or classes are config keys.
"""
from __future__ import annotations

import ast
import dataclasses
import types
from pathlib import Path
from typing import Sequence, TypeVar

Config = TypeVar("Config")


class ConfigError(ValueError):
    """A bad command line or config file; the message says which key or value."""


def configure(defaults: Config, argv: Sequence[str], verbose: bool = True) -> Config:
    """Apply config files and --key=value overrides in `argv` to the dataclass `defaults`."""
    values = dataclasses.asdict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"expected --key=value, got {arg!r}")
            value = _set(values, key, _parse_literal(text), origin=f"override {arg!r}")
            if verbose:
                print(f"Overriding: {key} = {value!r}")
        else:
            _apply_file(values, Path(arg), verbose)
    return dataclasses.replace(defaults, **values)


def usage(prog: str, defaults) -> str:
    """The help text: the command-line form, then every key with its default."""
    lines = [f"usage: {prog} [config_file.py ...] [--key=value ...]", "", "keys (default):"]
    lines += [f"  --{f.name}={getattr(defaults, f.name)!r}" for f in dataclasses.fields(defaults)]
    return "\n".join(lines)


def _parse_literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # e.g. --device=cpu, --out_dir=out-shakespeare-char


def _apply_file(values: dict, path: Path, verbose: bool) -> None:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found (overrides are written "
                          f"--key=value)")
    source = path.read_text()
    if verbose:
        print(f"Overriding config with {path}:")
        print(source)
    # The file runs with the current values in scope, so it may derive one key from another.
    namespace = dict(values)
    exec(compile(source, str(path), "exec"), namespace)
    for key, value in namespace.items():
        if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue  # __builtins__, imports, helpers
        _set(values, key, value, origin=f"config file {str(path)!r}")


def _set(values: dict, key: str, value, origin: str):
    if key not in values:
        raise ConfigError(f"unknown config key {key!r} in {origin}; known keys: "
                          f"{', '.join(sorted(values))}")
    default = values[key]
    if type(default) is float and type(value) is int:
        value = float(value)  # --dropout=0 means 0.0
    if type(value) is not type(default):
        raise ConfigError(f"{origin}: {key} must be of type {type(default).__name__} (like its "
                          f"default {default!r}), got {type(value).__name__} {value!r}")
    values[key] = value
    return value
