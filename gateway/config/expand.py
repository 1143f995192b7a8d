"""From YAML to the dataclasses: `${VAR}` expansion (after parsing, so secrets never have
to be YAML-safe), bounds on the document's shape, and typed coercion that names the dotted
key of any bad value."""

from __future__ import annotations

import math
import re
import secrets
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields, is_dataclass
from types import MappingProxyType
from typing import Any, Final, Union, get_args, get_origin, get_type_hints

from gateway.config.schema import T
from gateway.errors import ConfigError

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _EnvStr(str):
    """A string produced by `${VAR}` expansion: may be read as a number or bool."""


@dataclass(frozen=True, slots=True)
class _Refs:
    """The `${...}` references of one text and the placeholder spelling that stands for them.

    The spelling carries a random tag that the text itself does not contain, so no literal
    config text can stand for a reference (and pull an environment value in) or name one
    that does not exist.
    """

    pattern: re.Pattern[str]
    values: tuple[str, ...]
    marker: str


def _protect(text: str) -> tuple[str, _Refs | None]:
    """Swap each `${...}` for a YAML-safe placeholder before parsing.

    `admin: {token: ${TOKEN}}` is not valid YAML (the braces), yet the
    contract lets `${VAR}` stand anywhere; placeholders parse as plain scalars
    in block and flow style, and are expanded after parsing, so a secret's
    characters never meet the YAML parser. References in comments vanish with
    the comments and are never looked up.
    """
    if "${" not in text:
        return text, None
    marker = "__tower_gateway_env_" + secrets.token_hex(8)
    while marker in text:  # pragma: no cover - a 64-bit random tag already in the text
        marker = "__tower_gateway_env_" + secrets.token_hex(8)
    refs: list[str] = []

    def swap(match: re.Match[str]) -> str:
        refs.append(match.group(0))
        return f"{marker}_{len(refs) - 1}__"

    protected = _ENV_REF.sub(swap, text)
    pattern = re.compile(re.escape(marker) + r"_(\d+)__")
    return protected, _Refs(pattern, tuple(refs), marker)


def _expand(node: Any, path: str, env: Mapping[str, str], refs: _Refs | None = None) -> Any:
    if isinstance(node, dict):
        return {
            _expand(k, path, env, refs): _expand(v, _join(path, str(k)), env, refs)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_expand(v, f"{path}[{i}]", env, refs) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node
    if refs is not None and refs.marker in node:
        values = refs.values
        node = refs.pattern.sub(lambda m: values[int(m.group(1))], node)
    if "${" not in node:
        return node

    def substitute(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        value = env.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ConfigError(path, f"environment variable {name} is not set")
            return default
        return value

    return _EnvStr(_ENV_REF.sub(substitute, node))


MAX_CONFIG_VALUES: Final = 100_000


MAX_CONFIG_DEPTH: Final = 32


def _check_shape(data: Any) -> None:
    """Bounds the document before it is walked recursively: YAML aliases can make a
    small file a huge tree (each `*a` is a whole copy to walk) or a cycle (`&a [*a]`)."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError("", f"more than {MAX_CONFIG_VALUES} values (YAML aliases count)")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError("", f"nested deeper than {MAX_CONFIG_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
            stack.extend((key, depth + 1) for key in node)
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(get_args(tp)[0])}"
    if origin in (Mapping, dict) or tp is Mapping:
        return "a mapping"
    if is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, str(tp)
    )


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                if exc.path != path:
                    raise
                errors.append(exc)
        raise ConfigError(path, f"expected {_describe(tp)}")
    if isinstance(tp, type) and is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(path, "expected a mapping")
        return _build(tp, value, path)
    if origin is tuple:
        (item,) = get_args(tp)[:1]
        if not isinstance(value, list):
            raise ConfigError(path, f"expected {_describe(tp)}")
        return tuple(_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or origin is typing.Mapping:
        key_tp, value_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(path, "expected a mapping")
        out = {}
        for k, v in value.items():
            sub = _join(path, str(k))
            out[_coerce(key_tp, k, sub)] = _coerce(value_tp, v, sub)
        return MappingProxyType(out)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, _EnvStr) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(path, "expected true or false")
    if tp in (int, float):
        if isinstance(value, _EnvStr):
            try:
                value = int(value) if tp is int else float(value)
            except ValueError:
                raise ConfigError(path, f"expected {_describe(tp)}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected {_describe(tp)}")
        if tp is int and not isinstance(value, int):
            raise ConfigError(path, "expected an integer")
        try:
            number = tp(value)
        except OverflowError:  # an integer beyond any float
            raise ConfigError(path, f"{_describe(tp)} out of range") from None
        # inf or nan pass every "> 0" check and break later arithmetic (int(ttl)).
        if isinstance(number, float) and not math.isfinite(number):
            raise ConfigError(path, "expected a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, "expected a string")
        return str(value)
    raise ConfigError(path, f"unsupported type {tp}")  # pragma: no cover - schema bug


def _build(cls: type[T], data: Mapping[str, Any], path: str) -> T:
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}  # type: ignore[arg-type]
    for key in data:
        if key not in known:
            raise ConfigError(_join(path, str(key)), "unknown key")
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        sub = _join(path, name)
        if name in data:
            value = _coerce(hints[name], data[name], sub)
        elif f.default is not MISSING:
            value = f.default
        elif f.default_factory is not MISSING:
            value = f.default_factory()
        else:
            raise ConfigError(sub, "is required")
        check = f.metadata.get("check")
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise ConfigError(sub, problem)
        kwargs[name] = value
    return cls(**kwargs)
