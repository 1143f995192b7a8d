"""Revocation: a key dropped here at once (identities, tokens, open WebSockets), and on every
other replica through Redis when there is one.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.auth.identity import IdentityResolver
from gateway.auth.tokens import TokenMinter
from gateway.replicas.shared import Replicas
from gateway.websocket.registry import SocketRegistry


class Revoker:
    """What the admin API and the revocation bus call to make a key stop working."""

    def __init__(
        self, *, resolver: IdentityResolver, minter: TokenMinter, sockets: SocketRegistry
    ) -> None:
        self._resolver = resolver
        self._minter = minter
        self._sockets = sockets
        self.replicas: Replicas | None = None  # set while the gateway runs with Redis

    def invalidate_key_id(self, key_id: str) -> int:
        """Drop one key here at once, and on every replica through Redis in the background."""
        dropped = self.forget_locally([key_id])
        if self.replicas is not None:
            self.replicas.revoke_soon([key_id])
        return dropped

    async def revoke_key_ids(self, key_ids: Sequence[str]) -> int:
        """Like `invalidate_key_id`, returning once Redis and the other replicas were told."""
        dropped = self.forget_locally(key_ids)
        if self.replicas is not None:
            await self.replicas.revoke(key_ids)
        return dropped

    async def revoke_all(self) -> None:
        self.forget_locally(None)
        if self.replicas is not None:
            await self.replicas.revoke(None)

    def forget_locally(self, key_ids: Sequence[str] | None) -> int:
        """This process only (None: everything): identities, tokens, open WebSockets. What a
        revocation from another replica applies here."""
        if key_ids is None:
            self.drop_cache()
            self._sockets.invalidate_all()
            return 0
        digests = self._resolver.invalidate_key_ids(key_ids)
        for key_id in key_ids:
            self._sockets.invalidate_key_id(key_id)
        self._minter.forget(digests)
        return len(digests)

    def drop_cache(self) -> None:
        self._resolver.clear()
        self._minter.forget()
