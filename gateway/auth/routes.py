"""The route table, and the one path normalisation that both policy and upstream see.

Policy is decided on exactly the path the upstream receives: dot segments
resolved (also when spelled `%2e`), repeated slashes merged, escapes of
unreserved characters decoded (`%61dmin` is `admin`), other escapes kept and
upper-cased (`%2F` stays an encoded slash). A path that climbs above `/`, or
carries a NUL, a control character or a backslash, is refused.

Encoded delimiters are refused too (400 `bad_path`): many upstreams decode
`%5C` to a backslash (a `/` to some), `%3B` to a path parameter and `%2F` to
a slash after the gateway matched the path, and so would reach another route
than the one whose policy was applied. A route with `allow_encoded_slash: true`
accepts `%2F` alone, kept encoded, unless it stands next to a dot segment.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from gateway.config import RouteConfig
from gateway.errors import BadRequest, NotFound

_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE: Final = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Control characters, space, backslash (some servers read it as `/`) and `#`.
_FORBIDDEN: Final = re.compile(r"[\x00-\x20\x7f\\#]")


# Escapes of characters that delimit a path for some upstream: `\`, `;` (always
# refused) and `/` (refused unless the route allows it).
_DELIMITERS: Final = frozenset("\\;")
ENCODED_SLASH: Final = "%2F"
# The same, escaped twice (`%252F`), for upstreams that decode twice; and the
# overlong UTF-8 lead bytes (`%C0%AF` is `/` to a lax decoder), never valid UTF-8.
_HIDDEN_DELIMITER: Final = re.compile(r"%25(?:2[Ff]|5[Cc]|3[Bb])|%[Cc][01]")
_DOT_NEXT_TO_SLASH: Final = re.compile(r"(?:^|/|%2F)\.{1,2}(?:$|/|%2F)")


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    if char in _UNRESERVED:
        return char
    if char == "\x00":
        raise BadRequest("path contains an encoded NUL", reason="bad_path")
    if char in _DELIMITERS:
        raise BadRequest("path contains an encoded delimiter", reason="bad_path")
    return "%" + match.group(1).upper()


def check_encoded_slash(path: str, route: Route) -> None:
    """Refuses a normalised path with `%2F` unless `route` allows it, and then still
    when it stands next to a dot segment (`..%2F`, `%2F..`): an upstream that decodes
    it would resolve that segment."""
    if not route.config.allow_encoded_slash:
        raise BadRequest("path contains an encoded slash", reason="bad_path")
    if _DOT_NEXT_TO_SLASH.search(path):
        raise BadRequest("path has a dot segment next to an encoded slash", reason="bad_path")


def normalise_path(raw: str) -> str:
    """The normalised form of a request path (no query); raises `BadRequest`."""
    if not raw.startswith("/"):
        raise BadRequest("path must start with /", reason="bad_path")
    if _FORBIDDEN.search(raw):
        raise BadRequest("path contains a forbidden character", reason="bad_path")
    if "%" in raw:
        if _BAD_ESCAPE.search(raw):
            raise BadRequest("path contains a malformed %-escape", reason="bad_path")
        if _HIDDEN_DELIMITER.search(raw):
            raise BadRequest("path contains an encoded delimiter", reason="bad_path")
        raw = _ESCAPE.sub(_decode_unreserved, raw)
    if "//" not in raw and "/." not in raw:
        return raw  # the common case: nothing to resolve
    segments = raw.split("/")[1:]
    out: list[str] = []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        bare = segment.split(";", 1)[0]
        if bare in (".", ".."):
            if bare != segment:
                # `..;x` is a traversal to some servers and a name to others.
                raise BadRequest("path has a dot segment with parameters", reason="bad_path")
            if bare == "..":
                if not out:
                    raise BadRequest("path climbs above /", reason="bad_path")
                out.pop()
            if last:
                out.append("")
            continue
        if segment == "" and not last:
            continue
        out.append(segment)
    return "/" + "/".join(out)


def match_form(path: str) -> str:
    """The path routes are matched on: `;params` removed from every segment."""
    if ";" not in path:
        return path
    return "/".join(segment.split(";", 1)[0] for segment in path.split("/"))


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """A route from gateway.yaml, with what matching and forwarding need precomputed."""

    config: RouteConfig
    name: str
    prefix: str
    methods: frozenset[str] | None
    require: tuple[str, ...]
    upstream_origin: str  # scheme://host:port
    upstream_base: str  # path prefix on the upstream, without trailing slash
    upstream_host: str  # Host header value for the upstream
    audience: str  # `aud` of the JWTs minted for this route
    # Request-intent headers (`forward_headers`) this route passes on, lower-cased.
    forward: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, config: RouteConfig, audience: str = "internal") -> Route:
        parts = urlsplit(config.upstream)
        return cls(
            config=config,
            name=config.name or config.path,
            prefix=config.path.rstrip("/"),
            methods=frozenset(config.methods) if config.methods is not None else None,
            require=config.require,
            upstream_origin=f"{parts.scheme}://{parts.netloc}",
            upstream_base=parts.path.rstrip("/"),
            upstream_host=parts.netloc,
            audience=config.audience or audience,
            forward=frozenset(h.lower() for h in config.forward_headers),
        )

    def covers(self, path: str) -> bool:
        # Prefixes match on segment boundaries: `/admin` covers `/admin` and
        # `/admin/x`, never `/administrator`.
        prefix = self.prefix
        return not prefix or path == prefix or path.startswith(prefix + "/")


class RouteTable:
    """First matching prefix (and method) wins, in file order."""

    __slots__ = ("routes",)

    def __init__(self, routes: Iterable[RouteConfig], *, audience: str = "internal") -> None:
        self.routes: tuple[Route, ...] = tuple(Route.from_config(r, audience) for r in routes)

    def match(self, path: str, method: str) -> Route:
        """The route for a normalised path; what the proxy, WebSocket upgrades and
        `explain` all decide with."""
        target = match_form(path)
        for route in self.routes:
            if route.covers(target) and (route.methods is None or method in route.methods):
                if ENCODED_SLASH in path:
                    check_encoded_slash(path, route)
                return route
        # The detail names neither the path nor the method: both are client input.
        raise NotFound("no route for this method and path", reason="no_route")
