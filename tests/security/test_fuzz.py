"""Item 13: fuzzing with hypothesis. Credential extraction, path normalisation, the
WebSocket first message, config loading and tower answers take arbitrary input and
answer only in their own terms: a value or their one documented exception. Every crash
found is fixed and kept below as an explicit regression case."""

from __future__ import annotations

import contextlib
import json
import math
import string
import warnings
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth.credentials import CredentialExtractor
from gateway.auth.routes import RouteTable, normalise_path
from gateway.config import Config, parse_config, parse_config_text
from gateway.errors import BadRequest, ConfigError, NotFound, TowerFault
from gateway.http.headers import HeaderPolicy, canonical
from gateway.tower import MAX_FIELD_LENGTH, Identity, Rejection, parse_answer
from gateway.tower.client import RemoteTower
from gateway.websocket.auth_message import auth_key as _auth_key
from gateway.websocket.registry import Ending
from tests.conftest import ENV

# Hypothesis imports its patch writer to report a failure, and that import (through
# libcst) warns about mypy_extensions; under `filterwarnings = error` that warning
# would hide the failure behind an INTERNALERROR. Import it once, quietly, up front.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- credentials

HEADER_NAMES = st.sampled_from(
    [
        "X-API-Key",
        "x-api-key",
        "X_API_KEY",
        "X.Api.Key",
        "Authorization",
        "authorization",
        "Proxy-Authorization",
        "Cookie",
        "X-Other",
    ]
)
HEADER_VALUES = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda scheme, key: f"{scheme} {key}",
        st.sampled_from(["Bearer", "bearer", "ApiKey", "Basic", "", "Bearer  "]),
        st.text(max_size=40),
    ),
    st.text(alphabet=string.printable, max_size=600),
)
KEY_REASONS = {"repeated_key", "conflicting_keys", "malformed_key"}


@FUZZ
@given(pairs=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6))
def test_extraction_returns_a_clean_key_none_or_a_bad_request(
    pairs: list[tuple[str, str]],
) -> None:
    extractor = CredentialExtractor(("x-api-key", "authorization"), max_length=512)
    headers = CIMultiDictProxy(CIMultiDict(pairs))
    try:
        key = extractor.extract(headers)
    except BadRequest as refused:
        assert refused.reason in KEY_REASONS
        return
    if key is None:
        return
    assert 0 < len(key) <= 512 and key.isascii() and key.isprintable() and " " not in key
    sources = [v for n, v in pairs if n.lower() in ("x-api-key", "authorization")]
    assert any(key in value for value in sources)
    assert key in extractor.candidates(headers)


@FUZZ
@given(
    names=st.lists(
        st.text(alphabet=string.ascii_letters + "-_.", min_size=1, max_size=30), max_size=20
    )
)
def test_no_header_that_reads_as_an_identity_header_is_forwarded(names: list[str]) -> None:
    policy = HeaderPolicy(["Authorization", "X-API-Key"])
    headers = CIMultiDict((name, "v") for name in names)
    forwarded = policy.forwardable(headers, frozenset())
    for name in forwarded:
        assert not policy.blocked(name), name
        assert canonical(name) not in ("x-api-key", "authorization", "x-forwarded-user")


# --------------------------------------------------------------------------- paths

SEGMENTS = st.sampled_from(
    [
        "",
        ".",
        "..",
        "%2e",
        "%2E%2e",
        ".%2e",
        "%2f",
        "%2F",
        "a",
        "admin",
        "b;c",
        "..;",
        ";x",
        "%61",
        "%25",
        "%zz",
        "%",
        "~",
        "%7e",
        "%00",
        "\\",
        "é",
        "%c3%a9",
    ]
)
PATHS = st.one_of(
    st.lists(SEGMENTS, max_size=8).map(lambda parts: "/" + "/".join(parts)),
    st.text(max_size=60),
    st.text(alphabet="/.%2eEfF;a", max_size=40),
)


@FUZZ
@given(raw=PATHS)
@example(raw="/a/%2e%2e%2f..")
@example(raw="/..%2f")
@example(raw="/%2e%2e;x/a")
def test_normalise_path_is_idempotent_and_never_climbs(raw: str) -> None:
    try:
        path = normalise_path(raw)
    except BadRequest as refused:
        assert refused.reason == "bad_path"
        return
    assert path.startswith("/")
    assert normalise_path(path) == path
    assert "/../" not in path + "/" and "/./" not in path + "/", path
    assert "//" not in path, path
    table = RouteTable(
        parse_config(
            {
                "tower": {"url": "http://127.0.0.1:9"},
                "routes": [{"path": "/admin", "upstream": "http://127.0.0.1:9"}],
            },
            env=ENV,
        ).routes
    )
    try:
        table.match(path, "GET")
    except NotFound:
        pass
    except BadRequest as refused:  # an encoded slash, refused where the route decides
        assert refused.reason == "bad_path" and "%2F" in path, path


# --------------------------------------------------------------------------- WebSocket

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
AUTH_MESSAGES = st.one_of(
    st.text(max_size=200),
    JSON.map(json.dumps),
    st.builds(
        lambda key, extra: json.dumps({"type": "auth", "api_key": key, **extra}),
        st.one_of(st.text(max_size=40), JSON),
        st.dictionaries(st.text(max_size=5), JSON, max_size=2),
    ),
)


@FUZZ
@given(text=AUTH_MESSAGES)
@example(text="[" * 16_000)  # regression: RecursionError escaped json.loads
@example(text='{"type": "auth", "api_key": "' + "[" * 5000 + '"}')
@example(text="x" * 20_000)
def test_the_first_message_parser_answers_a_key_or_an_ending(text: str) -> None:
    result = _auth_key(text, 512)
    if isinstance(result, Ending):
        assert result.code in (1008, 4400, 4401)
        return
    assert isinstance(result, str) and 0 < len(result) <= 512
    assert result.isascii() and result.isprintable() and " " not in result


# --------------------------------------------------------------------------- config

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**310),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(
        ["${UNSET_VAR}", "${X:-1}", "http://[::1", "http://a:99999", "redis://x", "/", "//a", "*"]
    ),
)
CONFIG_VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=10,
)
KNOWN_PATHS = [
    ("server", "port"),
    ("server", "max_body_size"),
    ("server", "trusted_proxies"),
    ("server", "shutdown_timeout"),
    ("tower", "url"),
    ("tower", "timeout"),
    ("tower", "local"),
    ("tower", "budget"),
    ("cache", "ttl"),
    ("cache", "max_entries"),
    ("credentials", "sources"),
    ("credentials", "key_format"),
    ("credentials", "failed_auth_per_minute"),
    ("roles", "admin"),
    ("capabilities", "roles"),
    ("capabilities", "scopes"),
    ("routes",),
    ("jwt", "algorithm"),
    ("jwt", "ttl"),
    ("jwt", "header"),
    ("jwt", "secret"),
    ("rate_limit", "default_per_minute"),
    ("rate_limit", "burst"),
    ("redis", "url"),
    ("websocket", "allowed_origins"),
    ("admin", "token"),
    ("log", "level"),
]


def base_config() -> dict[str, Any]:
    return {
        "tower": {"url": "http://127.0.0.1:9"},
        "routes": [{"path": "/", "upstream": "http://127.0.0.1:9"}],
    }


def load(data: Any) -> Config | None:
    try:
        config = parse_config(data, env=ENV)
    except ConfigError:
        return None
    return config


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(KNOWN_PATHS), CONFIG_VALUES), max_size=4))
def test_config_mutations_load_or_raise_config_error(
    changes: list[tuple[tuple[str, ...], Any]],
) -> None:
    data = base_config()
    for path, value in changes:
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[path[-1]] = value
    config = load(data)
    if config is not None:
        for number in (config.cache.ttl, config.jwt.ttl, config.tower.timeout):
            assert math.isfinite(number)


@FUZZ
@given(data=CONFIG_VALUES)
def test_arbitrary_data_loads_or_raises_config_error(data: Any) -> None:
    load(data)


YAML_TEXT = st.one_of(
    st.text(max_size=200),
    st.text(alphabet="{}[]:,-&*!|>'\"#%@` \n\tabc01.${}", max_size=120),
)


@FUZZ
@given(text=YAML_TEXT)
def test_arbitrary_yaml_loads_or_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_config_text(text, env=ENV)


# Crashes found while fuzzing (or by reading the code it drove), kept as regressions.
CONFIG_REGRESSIONS = {
    "recursive_alias": "tower: &t {url: 'http://127.0.0.1:9', x: *t}\n",
    "alias_bomb": "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + "tower: {url: 'http://127.0.0.1:9'}\n",
    "deep_nesting": "tower: " + "[" * 5000 + "]" * 5000 + "\n",
    "bad_date": "tower: {url: 'http://127.0.0.1:9'}\nserver: {host: 2001-02-30}\n",
    "infinite_ttl": "tower: {url: 'http://127.0.0.1:9'}\njwt: {ttl: .inf}\n",
    "nan_timeout": "tower: {url: 'http://127.0.0.1:9', timeout: .nan}\n",
    "huge_int_float": "tower: {url: 'http://127.0.0.1:9', timeout: " + "9" * 400 + "}\n",
    "env_inf": "tower: {url: 'http://127.0.0.1:9', timeout: '${T:-1e999}'}\n",
    "broken_ipv6_url": "tower: {url: 'http://[::1'}\n",
    "broken_ipv6_route": "tower: {url: 'http://127.0.0.1:9'}\nroutes: [{path: /, upstream: 'http://[zz'}]\n",
    "broken_redis_url": "tower: {url: 'http://127.0.0.1:9'}\nredis: {url: 'redis://[::1'}\n",
    "binary": "tower: !!binary aGVsbG8=\n",
    "python_object": "tower: !!python/object:os.system {}\n",
}


@pytest.mark.parametrize("name", sorted(CONFIG_REGRESSIONS))
def test_config_regressions_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError):
        parse_config_text(CONFIG_REGRESSIONS[name], env=ENV)


# --------------------------------------------------------------------------- tower answers

FIELD = st.one_of(
    st.text(max_size=30),
    st.integers(),
    st.none(),
    st.booleans(),
    st.lists(st.text(max_size=5), max_size=3),
)
ANSWERS = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"valid": st.one_of(st.just(True), st.just(False), JSON)},
        optional={
            "key_id": FIELD,
            "user_id": FIELD,
            "role": FIELD,
            "scopes": st.one_of(st.lists(FIELD, max_size=5), FIELD),
            "expires_at": st.one_of(
                FIELD, st.floats(), st.integers(min_value=-(10**20), max_value=10**20)
            ),
            "metadata": st.one_of(
                JSON, st.fixed_dictionaries({}, optional={"team": FIELD, "rate_limit": JSON})
            ),
            "reason": FIELD,
        },
    ),
)


@FUZZ
@given(status=st.sampled_from([200, 201, 204, 301, 400, 401, 403, 404, 500, 503]), body=ANSWERS)
def test_parse_answer_is_an_identity_a_rejection_or_a_fault(status: int, body: Any) -> None:
    try:
        answer = parse_answer(status, body, now=1_700_000_000.0)
    except TowerFault as fault:
        assert fault.kind in TowerFault.KINDS
        return
    assert isinstance(answer, Identity | Rejection)
    if isinstance(answer, Identity):
        assert status == 200 and body["valid"] is True
        for text in (answer.key_id, answer.user_id, answer.role, *answer.scopes):
            assert 0 < len(text) <= MAX_FIELD_LENGTH and text.isprintable()
        assert answer.expires_at is None or (
            math.isfinite(answer.expires_at) and answer.expires_at > 1_700_000_000
        )
        assert answer.team is None or answer.team.isprintable()


@FUZZ
@given(
    status=st.integers(min_value=100, max_value=599),
    raw=st.one_of(st.binary(max_size=200), ANSWERS.map(lambda b: json.dumps(b).encode())),
)
@example(status=200, raw=b"[" * 100_000)
@example(status=200, raw=b"\xff\xfe{")
@example(
    status=200,
    raw=b'{"valid": true, "key_id": "k", "user_id": "u", "role": "r", "expires_at": NaN}',
)
def test_the_remote_client_reads_any_bytes_as_an_answer_or_a_fault(status: int, raw: bytes) -> None:
    try:
        answer = RemoteTower._interpret(status, raw)
    except TowerFault:
        return
    assert isinstance(answer, Identity | Rejection)
    if isinstance(answer, Identity):
        assert status == 200
