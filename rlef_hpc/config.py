"""Typed configs: nested dataclasses, loaded from YAML with dotted command-line overrides.

    cfg = load(TrainConfig, "configs/llama3_8b.yaml", ["ppo.kl_coef=0.02", "run.iterations=10"])

Every key is checked against the dataclass it lands in: an unknown key names its path and the
keys allowed there; a value of the wrong type names its path, the type wanted and the value.
A top-level group that a layer above owns (the class's `foreign_groups`) is skipped; a key
renamed since (the class's `renamed_keys`) is refused with its new name.
Override values are parsed as YAML scalars (`0.02`, `true`, `[1, 2]`, `null`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used, with the key path at fault."""


def _check(path: str, value: Any, hint: Any) -> Any:
    """`value` as type `hint` (ints accepted for floats, lists for tuples), or ConfigError."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        errors = []
        for option in typing.get_args(hint):
            if option is type(None):
                continue
            try:
                return _check(path, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(
                f"{path}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}"
            )
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{path}: expected a mapping of {hint.__name__} fields, got {value!r}"
            )
        return from_dict(hint, value, path)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            items = [_check(f"{path}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args))]  # noqa: B905
        else:
            item = args[0] if args else Any
            items = [_check(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
        return origin(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool or hint is int:
        if type(value) is not hint:
            raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r}")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Builds dataclass `cls` from a (nested) mapping; absent keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    # Groups a layer above owns (`foreign_groups`, e.g. TrainConfig's `slurm`) are skipped: the
    # same file serves both layers, and the lower one must not import the upper one's types.
    foreign = set(getattr(cls, "foreign_groups", ())) - set(names)
    data = {k: v for k, v in data.items() if k not in foreign}
    unknown = sorted(set(data) - set(names))
    # Keys renamed since (the class's `renamed_keys`, old -> new) are named with their new name.
    renamed = [k for k in unknown if k in getattr(cls, "renamed_keys", {})]
    if renamed:
        old = _join(path, renamed[0])
        new = _join(path, cls.renamed_keys[renamed[0]])  # type: ignore[attr-defined]
        raise ConfigError(f"{old!r} is now {new!r}: rename it")
    if unknown:
        where = path or "the top level"
        raise ConfigError(
            f"unknown key {_join(path, unknown[0])!r} in {where}; allowed: {', '.join(names)}"
        )
    kwargs = {k: _check(_join(path, k), v, hints[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        message = str(e)
        if path and message.startswith(f"{path}."):  # it names its key already
            raise ConfigError(message) from None
        raise ConfigError(f"{path or cls.__name__}: {message}") from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain (YAML-able) form of a config: tuples become lists."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`a.b.c=value` pairs set into a nested mapping (YAML-parsed values)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. ppo.kl_coef=0.02")
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a group")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """`cls` from a YAML file (or its defaults, without one) and dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            # One line, as every config error: YAML's own message spans several.
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        except (OSError, UnicodeDecodeError) as e:  # a directory, unreadable, not text
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(f"{path}: cannot read this config file ({reason})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config groups")
    try:
        return from_dict(cls, apply_overrides(data, overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def load_or_exit(parser: Any, cls: type[T], path: str | Path | None, overrides: Sequence[str]) -> T:
    """load(), or the command line's exit: status 2 and one line naming the key."""
    try:
        return load(cls, path, overrides)
    except (ConfigError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def require_at_least(group: str, cfg: Any, **minimums: float) -> None:
    """Each named field of `cfg` (the config group at `group`) at least its minimum, else a
    ValueError naming the first that is not: "rollout.workers must be at least 1, got 0", or
    "... must not be negative, got -1" where 0 is allowed. For a group's __post_init__."""
    for key, low in minimums.items():
        value = getattr(cfg, key)
        if value < low:
            bound = "not be negative" if low == 0 else f"be at least {low}"
            raise ValueError(f"{group}.{key} must {bound}, got {value}")


def require_positive(group: str, cfg: Any, *keys: str) -> None:
    """Each named field of `cfg` above 0 (a temperature, a timeout: any small value works, 0
    does not), else a ValueError naming the first that is not."""
    for key in keys:
        value = getattr(cfg, key)
        if not value > 0:
            raise ValueError(f"{group}.{key} must be above 0, got {value}")


def describe(cls: type, path: str = "") -> list[str]:
    """One line per key (`group.key: type = default`), for --help."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        key = _join(path, f.name)
        if dataclasses.is_dataclass(hint):
            doc = (hint.__doc__ or "").strip().splitlines()
            lines.append(f"{key}:  {doc[0] if doc else ''}")
            lines += describe(hint, key)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        lines.append(f"  {key}: {name} = {default!r}")
    return lines
