"""gateway.yaml as a JSON Schema (draft 2020-12), read from the dataclasses `load_config` uses.

Field names, types, defaults and required keys come from the frozen sections in
`gateway.config`; unknown keys are errors there, so every object here has
`additionalProperties: false`. A field's value rule (`metadata["check"]`) is a
Python function; `_BY_CHECK` and `_BY_FIELD` say the same in JSON Schema words,
and a check neither table knows stops the generator, so a new check cannot
ship without its schema. Wherever the loader reads a number or a boolean from a string,
`${VAR}` and `${VAR:-default}` are accepted as well.

`check-config` stays the authority: rules across keys (a remote tower needs
credentials, HS256 needs a secret of 32 bytes) are not expressed here.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Final, Union, get_args, get_origin, get_type_hints

from gateway.config import expand
from gateway.config import schema as cfg

DRAFT: Final = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_FILE: Final = "config/gateway.schema.json"
ENV_REF: Final = "#/$defs/env_ref"

_HTTP_URL: Final = {"pattern": r"^https?://[^/?#@\s]+(/[^?#]*)?$"}
_KEY_PREFIX: Final = {"pattern": "^[a-z][a-z0-9]{0,15}$"}

# Value rules by the check function itself (named, module-level checks) ...
_BY_CHECK: Final[Mapping[Callable[..., Any], Mapping[str, Any]]] = {
    cfg._positive: {"exclusiveMinimum": 0},
    cfg._non_negative: {"minimum": 0},
    cfg._fraction: {"minimum": 0, "exclusiveMaximum": 1},
    cfg._ratio: {"minimum": 0, "maximum": 1},
    cfg._pool_size: {"minimum": 2},
    cfg._port: {"minimum": 0, "maximum": 65535},
    cfg._http_url: _HTTP_URL,
    cfg._redis_url: {"pattern": "^(redis|rediss|unix):"},
    cfg._route_path: {
        "pattern": "^/[^?#]*$",
        "not": {"pattern": r"//|/\.\.?(/|$)"},
    },
    cfg._cidrs: {"items": {"pattern": r"^[0-9A-Fa-f:.]+(/[0-9]+)?$"}},
    cfg._methods: {"items": {"pattern": "^[A-Z]+$"}},
    cfg._log_target: {"pattern": r"\S"},
    cfg._forward_headers: {
        # ECMA-262 patterns have no inline case flag: each letter gets its two cases.
        "items": {
            "pattern": "^("
            + "|".join(
                "".join(f"[{c.upper()}{c}]" if c.isalpha() else c for c in name)
                for name in sorted(cfg.INTENT_HEADERS)
            )
            + ")$"
        }
    },
    cfg._audience: {"pattern": "^[\\x21-\\x7e]{1,256}$"},
    cfg._token: {"minLength": 16},
}
# ... and, for checks written in place (lambdas, `_one_of`), by section and key.
_BY_FIELD: Final[Mapping[tuple[type, str], Mapping[str, Any]]] = {
    (cfg.LocalTowerConfig, "prefix"): _KEY_PREFIX,
    (cfg.KeyFormatConfig, "prefix"): _KEY_PREFIX,
    (cfg.CredentialsConfig, "sources"): {
        "minItems": 1,
        "uniqueItems": True,
        "items": {"enum": list(cfg.CREDENTIAL_SOURCES)},
    },
    (cfg.JwtConfig, "header"): {"pattern": "^[A-Za-z0-9-]+$"},
    (cfg.JwtConfig, "algorithm"): {"enum": list(cfg.JWT_ALGORITHMS)},
    (cfg.JwtConfig, "ttl"): {"minimum": 10},
    (cfg.RateLimitConfig, "backend"): {"enum": ["memory", "redis"]},
    (cfg.RateLimitConfig, "mode"): {"enum": ["exact", "batched"]},
    (cfg.LogConfig, "level"): {"enum": ["DEBUG", "INFO", "WARNING", "ERROR"]},
    # Empty only in decision-only mode (server.enabled: false), which check-config checks.
    (cfg.RouteConfig, "upstream"): {"pattern": r"^(https?://[^/?#@\s]+(/[^?#]*)?)?$"},
}


class SchemaError(Exception):
    """The dataclasses hold something this generator cannot express (a bug to fix here)."""


def _rule(cls: type, name: str, check: Any) -> Mapping[str, Any]:
    if check is None:
        return {}
    rule = _BY_FIELD.get((cls, name)) or _BY_CHECK.get(check)
    if rule is None:
        raise SchemaError(f"{cls.__name__}.{name}: its check has no JSON Schema rule here")
    return rule


def _plain(value: Any) -> Any:
    """A default as JSON data."""
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in fields(value)
            if not f.metadata.get("internal")
        }
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


_SCALARS: Final = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _type(tp: Any, rule: Mapping[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """The schema of a value of Python type `tp`, with `rule` applied to its non-null form."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options: list[Any] = []
        for arg in get_args(tp):
            one = {"type": "null"} if arg is type(None) else _type(arg, rule, defs)
            options.extend(one["anyOf"] if list(one) == ["anyOf"] else [one])
        return options[0] if len(options) == 1 else {"anyOf": options}
    if isinstance(tp, type) and is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = _section(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}", **rule}
    if origin is tuple:
        return {"type": "array", "items": _type(get_args(tp)[0], {}, defs), **_merge_items(rule)}
    if origin in (Mapping, dict) or origin is typing.Mapping:
        key_tp, value_tp = get_args(tp)
        if key_tp is not str:
            raise SchemaError(f"mapping keys of type {key_tp}")
        return {"type": "object", "additionalProperties": _type(value_tp, {}, defs), **rule}
    if tp in _SCALARS:
        plain = {"type": _SCALARS[tp], **rule}
        if tp is str and not rule:
            return plain
        # The loader reads numbers and booleans from `${VAR}`; a string with a rule may
        # be `${VAR:-...}` whose value is only known when it is loaded.
        return {"anyOf": [plain, {"$ref": ENV_REF}]}
    raise SchemaError(f"unsupported type {tp}")


def _merge_items(rule: Mapping[str, Any]) -> dict[str, Any]:
    """An array rule's `items` words are added to the item schema by `allOf`, not replaced."""
    out = dict(rule)
    if "items" in out:
        out["allOf"] = [{"items": out.pop("items")}]
    return out


def _section(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    hints = get_type_hints(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for f in fields(cls):
        if f.metadata.get("internal"):
            continue
        schema = _type(hints[f.name], _rule(cls, f.name, f.metadata.get("check")), defs)
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            required.append(f.name)
            default = MISSING
        if default is not MISSING and not is_dataclass(default):  # a section: see its $defs
            schema = {**schema, "default": _plain(default)}
        properties[f.name] = schema
    out: dict[str, Any] = {"type": "object"}
    doc = cls.__doc__ or ""
    if doc and not doc.startswith(f"{cls.__name__}("):  # not the generated signature
        out["description"] = " ".join(doc.split())
    out["properties"] = properties
    if required:
        out["required"] = required
    out["additionalProperties"] = False
    return out


def config_schema() -> dict[str, Any]:
    """The JSON Schema of gateway.yaml."""
    defs: dict[str, Any] = {}
    top = _section(cfg.Config, defs)
    defs["env_ref"] = {
        "description": "${VAR} or ${VAR:-default}, expanded from the environment when loaded",
        "type": "string",
        "pattern": expand._ENV_REF.pattern,
    }
    return {
        "$schema": DRAFT,
        "title": "tower-gateway configuration (gateway.yaml)",
        "description": (
            "Generated by `tower-gateway config schema`. Every string may use ${VAR} or "
            "${VAR:-default}; unknown keys are errors; durations are seconds. "
            "`tower-gateway check-config` also checks the rules that span several keys."
        ),
        **top,
        **_DECISION_ONLY,
        "$defs": dict(sorted(defs.items())),
    }


# `server.enabled: false` (decision mode only) needs `decision:`; otherwise every route
# needs its upstream.
_DECISION_ONLY: Final = {
    "if": {
        "properties": {
            "server": {"properties": {"enabled": {"const": False}}, "required": ["enabled"]}
        },
        "required": ["server"],
    },
    "then": {"properties": {"decision": {"type": "object"}}, "required": ["decision"]},
    "else": {"properties": {"routes": {"items": {"required": ["upstream"]}}}},
}


def render() -> str:
    """The schema as the committed file holds it (`config/gateway.schema.json`)."""
    return json.dumps(config_schema(), indent=2, ensure_ascii=True) + "\n"


def cmd_schema(_args: argparse.Namespace) -> int:
    print(render(), end="")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`tower-gateway config schema`."""
    config = sub.add_parser("config", help="about gateway.yaml itself")
    actions = config.add_subparsers(dest="config_command", required=True)
    schema = actions.add_parser(
        "schema", help="print the JSON Schema of gateway.yaml (for editors and CI)"
    )
    schema.set_defaults(func=cmd_schema)
