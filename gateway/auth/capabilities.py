"""Tower roles and scopes -> internal role and capabilities, and the capability check.

Capabilities produced by gateway.yaml are globs (`execute:*`); a raw tower scope
kept by `keep_scopes` is a literal that satisfies only an identical
requirement, so no tower answer can widen itself into `*`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Final

from gateway.config import Config
from gateway.tower import Identity

log = logging.getLogger("tower_gateway.capabilities")

# Distinct (role, scopes) combinations are few in practice; the bound only
# stops a hostile tower from growing the memo without limit.
MAX_MEMO: Final = 10_000
# What fnmatch reads as pattern syntax.
_GLOB_CHARS: Final = re.compile(r"[*?\[\]]")


@dataclass(frozen=True, slots=True, eq=False)
class Grants:
    """What one identity may do; `check` answers a route's requirements."""

    role: str | None
    globs: frozenset[str]
    literals: frozenset[str]
    caps: tuple[str, ...]
    _verdicts: dict[str, bool] = field(default_factory=dict, repr=False)

    def allows(self, required: str) -> bool:
        verdict = self._verdicts.get(required)
        if verdict is None:
            verdict = required in self.literals or any(
                fnmatchcase(required, glob) for glob in self.globs
            )
            if len(self._verdicts) < MAX_MEMO:
                self._verdicts[required] = verdict
        return verdict

    @property
    def claimed(self) -> tuple[str, ...]:
        """`caps` as the JWT states them, for upstreams that read every cap as a glob.

        A raw tower scope with glob characters (`*`, `admin:*`, `[a]dmin:full`) is a
        literal here, but in a token it would read as a glob and widen itself; it is
        left out of `caps` (the `scopes` claim still lists it as the tower sent it).
        """
        return tuple(c for c in self.caps if c in self.globs or not _GLOB_CHARS.search(c))

    def missing(self, required: tuple[str, ...]) -> str | None:
        """The first required capability these grants lack, or `None`."""
        for cap in required:
            if not self.allows(cap):
                return cap
        return None


class CapabilityMapper:
    """Applies the `roles` and `capabilities` sections; memoised per (role, scopes)."""

    __slots__ = ("_keep_scopes", "_memo", "_role_caps", "_roles", "_scope_caps", "_unknown_seen")

    def __init__(self, config: Config) -> None:
        self._roles: Mapping[str, str] = config.roles
        self._role_caps = config.capabilities.roles
        self._scope_caps = tuple(config.capabilities.scopes.items())
        self._keep_scopes = config.capabilities.keep_scopes
        self._memo: dict[tuple[str, tuple[str, ...]], Grants] = {}
        self._unknown_seen: set[str] = set()

    def grants(self, identity: Identity) -> Grants:
        memo_key = (identity.role, identity.scopes)
        grants = self._memo.get(memo_key)
        if grants is None:
            grants = self._compute(identity.role, identity.scopes)
            if len(self._memo) >= MAX_MEMO:
                self._memo.clear()
            self._memo[memo_key] = grants
        return grants

    def _compute(self, tower_role: str, scopes: tuple[str, ...]) -> Grants:
        role = self._roles.get(tower_role)
        globs: set[str] = set()
        if role is None:
            if tower_role not in self._unknown_seen and len(self._unknown_seen) < MAX_MEMO:
                self._unknown_seen.add(tower_role)
                log.warning(
                    "tower role %r is not mapped: no role, no role capabilities", tower_role
                )
        else:
            globs.update(self._role_caps.get(role, ()))
        for scope in scopes:
            for pattern, caps in self._scope_caps:
                if fnmatchcase(scope, pattern):
                    globs.update(caps)
        literals = frozenset(scopes) if self._keep_scopes else frozenset()
        return Grants(
            role=role,
            globs=frozenset(globs),
            literals=literals,
            caps=tuple(sorted(globs | literals)),
        )
