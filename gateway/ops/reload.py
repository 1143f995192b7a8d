"""Hot reload (SIGHUP, `POST /admin/reload`): re-read the config file and swap what may change.

An invalid file is rejected with the dotted key and the reason, and the running
config stays. A valid one becomes a new `Components`, assigned in one
statement: a request reads the components once when it starts and finishes on
them, so it sees all of the old config or all of the new, never a mix.

Live (applied at once): `routes`, `roles`, `capabilities`, `credentials`,
`websocket`, `server.trusted_proxies`, `rate_limit.default_per_minute`,
`log.level`, `decision.cache_ttl`/`token`/`allow_from`, and `jwt` with the signing
key: the key file (or secret) is read on every reload, so a replaced file is a new
key for new tokens at once, the old public key stays in the JWKS for one token
lifetime and tokens it signed are no longer reused. Everything else needs a
restart: the listeners (`server.*`, `ops`, `decision.host`/`port`), the clients
and caches built at start (`tower`, `cache`, `redis`,
`rate_limit.backend`/`burst`), the log sinks and
`admin` (with `--workers`, the supervisor talks to its workers with the token
they all started with). A reload that changes one of those applies the live
keys, keeps the running values of the others and says which need a restart.
Every attempt also reopens the log files, so logrotate can send SIGHUP.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Final

from gateway.auth.tokens import SigningKey, load_signing_key, same_key
from gateway.config import Config, load_config
from gateway.errors import ConfigError
from gateway.ops.audit import AuditLog
from gateway.ops.metrics import Metrics

log = logging.getLogger("tower_gateway.reload")

LIVE_KEYS: Final = frozenset(
    {
        "routes",
        "roles",
        "capabilities",
        "credentials",
        "websocket",
        "server.trusted_proxies",
        "rate_limit.default_per_minute",
        "log.level",
        "jwt",
        # Read per decision by the decision listener; its address needs a restart.
        "decision.cache_ttl",
        "decision.token",
        "decision.allow_from",
    }
)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What one reload did: the live keys it changed, or why it changed nothing."""

    ok: bool
    source: str
    trigger: str
    changed: tuple[str, ...] = ()
    restart_required: tuple[str, ...] = ()
    error: str | None = None
    error_path: str | None = None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "reloaded": self.ok,
            "source": self.source,
            "changed": list(self.changed),
            "restart_required": list(self.restart_required),
        }
        if self.restart_required:
            body["warning"] = (
                "these keys changed but need a restart; their running values are kept: "
                + ", ".join(self.restart_required)
            )
        if not self.ok:
            body.update(error="invalid_config", detail=self.error, path=self.error_path)
        return body


def _differences(path: str, old: Any, new: Any) -> list[str]:
    """Dotted keys where two config values differ, down to the leaves of nested sections."""
    if old == new:
        return []
    if is_dataclass(old) and is_dataclass(new) and type(old) is type(new):
        found: list[str] = []
        for f in fields(old):
            found += _differences(f"{path}.{f.name}", getattr(old, f.name), getattr(new, f.name))
        return found
    return [path]


def merge(running: Config, loaded: Config) -> tuple[Config, tuple[str, ...], tuple[str, ...]]:
    """(the config to run: `loaded`'s live keys on `running`'s other keys, the live keys that
    changed, the restart-only keys that changed)."""
    changed: list[str] = []
    restart: list[str] = []
    sections: dict[str, Any] = {}
    for section in fields(Config):
        name = section.name
        if section.metadata.get("internal"):
            continue
        old, new = getattr(running, name), getattr(loaded, name)
        if name in LIVE_KEYS:
            if old != new:
                changed.append(name)
                sections[name] = new
            continue
        updates: dict[str, Any] = {}
        for key in _differences(name, old, new):
            if "." not in key:  # a whole optional section set or unset (`decision`)
                restart.append(key)
                continue
            field_name = key.split(".")[1]
            live = f"{name}.{field_name}"
            if live in LIVE_KEYS:
                updates[field_name] = getattr(new, field_name)
                changed.append(live)
            else:
                restart.append(key)
        if updates:
            sections[name] = dataclasses.replace(old, **updates)
    return dataclasses.replace(running, **sections), tuple(changed), tuple(restart)


def shadow_routes(config: Config) -> list[str]:
    return [r.name or r.path for r in config.routes if r.auth and not r.enforce]


class Reloader:
    """Reloads one gateway from the file its config came from; keeps the last result.

    `current` is the config in effect, `apply` swaps a new one in, `signing_key` is the
    key in use and `rotate_key` replaces it, `reopen_logs` reopens the log files
    (logrotate), `audit` is the audit log in use.
    """

    def __init__(
        self,
        source: str,
        *,
        current: Callable[[], Config],
        apply: Callable[[Config], None],
        signing_key: Callable[[], SigningKey],
        rotate_key: Callable[[SigningKey, Config], None],
        reopen_logs: Callable[[], None],
        audit: Callable[[], AuditLog],
        metrics: Metrics,
    ) -> None:
        self._current = current
        self._apply = apply
        self._signing_key = signing_key
        self._rotate_key = rotate_key
        self._reopen_logs = reopen_logs
        self._audit = audit
        self._metrics = metrics
        self.source = source
        path = Path(source)
        # `source` is "<dict>" or "<text>" for a config that came from no file.
        self.path: str | None = str(path.resolve()) if path.is_file() else None
        self.last: ReloadResult | None = None

    def reload(self, *, trigger: str, client: str | None = None) -> ReloadResult:
        """Synchronous on purpose: nothing else runs on the loop between the read and the swap,
        so two reloads (a SIGHUP during a POST) never interleave."""
        self._reopen_logs()
        source = self.path or self.source
        try:
            if self.path is None:
                raise ConfigError("", "the running config was not loaded from a file")
            loaded = load_config(self.path)
            effective, changed, restart = merge(self._current(), loaded)
            # The key file's contents, not only its name: a replaced file is a new key.
            key = load_signing_key(effective.jwt)
            new_key = not same_key(key, self._signing_key())
            if new_key and "jwt" not in changed:
                changed += ("jwt",)
            if changed:
                self._apply(effective)
            if new_key or "jwt" in changed:
                self._rotate_key(key, effective)
        except ConfigError as exc:
            result = ReloadResult(False, source, trigger, error=str(exc), error_path=exc.path)
            self._failed(result, client)
            return result
        except Exception as exc:
            # A bug building the new components must not take the running config with it.
            log.exception("config reload (%s): cannot apply the new config", trigger)
            error = f"cannot apply the new config ({type(exc).__name__})"
            result = ReloadResult(False, source, trigger, error=error)
            self._failed(result, client)
            return result
        result = ReloadResult(True, source, trigger, changed, restart)
        self._succeeded(result, effective, client)
        return result

    def _failed(self, result: ReloadResult, client: str | None) -> None:
        metrics = self._metrics
        metrics.config_reloads.labels("failure").inc()
        metrics.config_last_ok.set(0)
        log.error(
            "config reload (%s) failed, the running config stays: %s", result.trigger, result.error
        )
        self.last = result
        self._audit().admin(
            "reload",
            client=client,
            ok=False,
            trigger=result.trigger,
            error=result.error,
            path=result.error_path,
        )

    def _succeeded(self, result: ReloadResult, effective: Config, client: str | None) -> None:
        metrics = self._metrics
        metrics.config_reloads.labels("success").inc()
        metrics.config_last_ok.set(1)
        metrics.config_last_success.set(time.time())
        metrics.config_restart_pending.set(len(result.restart_required))
        if "log.level" in result.changed:
            logging.getLogger().setLevel(effective.log.level)
        log.info(
            "config reloaded (%s) from %s: %s",
            result.trigger,
            result.source,
            ", ".join(result.changed) if result.changed else "no live setting changed",
        )
        if result.restart_required:
            log.warning(
                "config reload: %s changed but only a restart applies them; "
                "the running values are kept",
                ", ".join(result.restart_required),
            )
        if "routes" in result.changed and shadow_routes(effective):
            log.warning(
                "routes in shadow mode (enforce: false), denials are logged, not enforced: %s",
                ", ".join(shadow_routes(effective)),
            )
        self.last = result
        self._audit().admin(
            "reload",
            client=client,
            ok=True,
            trigger=result.trigger,
            changed=list(result.changed),
            restart_required=list(result.restart_required),
        )
