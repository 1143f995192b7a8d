"""The `keys create|list|show|update|revoke|rotate` and `tower serve` commands.

Exit codes: 0 done, 1 the key store refused the request, 2 a configuration problem.
A raw key is printed once, on the last line of `create` and `rotate` output. The
commands run the same operations as the admin API (`gateway.tower.keys_ops`) on the
store file; unlike the API they cannot reach running gateways' caches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sqlite3
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Final

from aiohttp import web

from gateway.config import Config, LocalTowerConfig, default_config_path, load_sections
from gateway.errors import ConfigError
from gateway.tower import keys_ops
from gateway.tower.local import resolve_hash_secret
from gateway.tower.records import KeyRecord, StoreError
from gateway.tower.server import create_tower_app
from gateway.tower.store import KeyStore

DEFAULT_TOWER_HOST: Final = "127.0.0.1"
DEFAULT_TOWER_PORT: Final = 9999
EXIT_STORE: Final = 1
EXIT_CONFIG: Final = 2

Command = Callable[[argparse.Namespace], int]


class _Fail(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _load(args: argparse.Namespace) -> tuple[Config, LocalTowerConfig]:
    # Only what these commands use: the embedded tower and the role map (for a warning);
    # the gateway's JWT secret and the rest are neither needed nor checked here.
    cfg = load_sections(args.config or default_config_path(), ("tower", "roles"))
    if cfg.tower.local is None:
        raise ConfigError("tower.local", "is not set: keys live in the embedded tower ({db: path})")
    return cfg, cfg.tower.local


def _open_store(local: LocalTowerConfig) -> KeyStore:
    return KeyStore(local.db, prefix=local.prefix, hash_secret=resolve_hash_secret(local))


def _guarded(command: Command) -> Command:
    """Turn expected failures into one `error:` line and an exit code, never a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ConfigError as exc:
            message = f"{exc.path}: {exc.message}" if exc.path else exc.message
            print(f"error: {message}", file=sys.stderr)
            return EXIT_CONFIG
        except StoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_STORE
        except sqlite3.Error as exc:
            print(f"error: key store: {exc}", file=sys.stderr)
            return EXIT_STORE
        except _Fail as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.code

    return run


def _when(ts: float | None, never: str = "never") -> str:
    if ts is None:
        return never
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _describe(record: KeyRecord) -> list[str]:
    fields = [
        ("key_id", record.key_id),
        ("prefix", record.display_prefix),
        ("user_id", record.user_id),
        ("role", record.role),
        ("scopes", ", ".join(record.scopes) or "-"),
        ("env", record.env),
        ("expires", _when(record.expires_at)),
    ]
    fields += [
        (name, str(record.metadata[name]))
        for name in ("team", "rate_limit")
        if record.metadata.get(name) is not None
    ]
    return [f"{name + ':':<12}{value}" for name, value in fields]


def _number(text: str) -> float:
    """A float, kept an int when whole, so `--rate-limit 60` is stored as 60."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _print_new_key(record: KeyRecord, raw_key: str, intro: Sequence[str] = ()) -> None:
    for line in [*intro, *_describe(record)]:
        print(line)
    print("Store this key now: it is shown only this once.")
    print(raw_key, flush=True)


def _create(args: argparse.Namespace) -> int:
    cfg, local = _load(args)
    new = keys_ops.parse_create(
        {
            "user_id": args.user_id,
            "role": args.role,
            "scopes": args.scope,
            "expires_in_days": args.expires_in_days,
            "env": args.env,
            "rate_limit": args.rate_limit,
            "team": args.team,
        }
    )
    store = _open_store(local)
    try:
        raw, record = keys_ops.create_key(store, new)
    finally:
        store.close()
    if args.role not in cfg.roles:
        print(
            f"warning: role {args.role!r} is not mapped in `roles`; the gateway will not "
            "recognise it",
            file=sys.stderr,
        )
    _print_new_key(record, raw)
    return 0


def _list(args: argparse.Namespace) -> int:
    _, local = _load(args)
    store = _open_store(local)
    try:
        records = store.list()
    finally:
        store.close()
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=2))
        return 0
    header = ("KEY_ID", "PREFIX", "USER", "ROLE", "SCOPES", "STATUS", "EXPIRES", "LAST_USED")
    rows = [header] + [
        (
            r.key_id,
            r.display_prefix,
            r.user_id,
            r.role,
            ",".join(r.scopes) or "-",
            r.state(),
            _when(r.expires_at),
            _when(r.last_used_at),
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    _, local = _load(args)
    store = _open_store(local)
    try:
        record = keys_ops.revoke_key(store, args.key_id, args.reason)
    finally:
        store.close()
    print(
        f"revoked {record.key_id} ({record.display_prefix}, user {record.user_id}) "
        f"at {_when(record.revoked_at)}: {record.revoke_reason}"
    )
    _cache_note()
    return 0


def _cache_note() -> None:
    print(
        "note: running gateways may accept the key as it was until their cache entry "
        "expires; the admin API (/admin/keys) applies a change at once",
        file=sys.stderr,
    )


def _show(args: argparse.Namespace) -> int:
    _, local = _load(args)
    store = _open_store(local)
    try:
        record = store.get(args.key_id)
    finally:
        store.close()
    if args.json:
        view = {"record": keys_ops.key_json(record), "usage": keys_ops.usage_json(record)}
        print(json.dumps(view, indent=2))
        return 0
    extra = [
        ("status", keys_ops.status(record)),
        ("created", _when(record.created_at)),
        ("last_used", _when(record.last_used_at)),
        ("requests", str(record.use_count)),
    ]
    for line in [*_describe(record), *(f"{name + ':':<12}{value}" for name, value in extra)]:
        print(line)
    return 0


def _update(args: argparse.Namespace) -> int:
    _, local = _load(args)
    body: dict[str, object] = {}
    if args.role is not None:
        body["role"] = args.role
    if args.scope is not None:
        body["scopes"] = args.scope
    if args.never_expires:
        body["expires_at"] = None
    elif args.expires_in_days is not None:
        body["expires_in_days"] = args.expires_in_days
    if args.rate_limit is not None:
        body["rate_limit"] = args.rate_limit or None  # 0: back to the default
    if args.team is not None:
        body["team"] = args.team or None  # "": no team
    changes = keys_ops.parse_update(body)
    store = _open_store(local)
    try:
        record = keys_ops.update_key(store, args.key_id, changes)
    finally:
        store.close()
    print(f"updated {record.key_id}: {', '.join(sorted(changes))}")
    for line in _describe(record):
        print(line)
    _cache_note()
    return 0


def _rotate(args: argparse.Namespace) -> int:
    _, local = _load(args)
    store = _open_store(local)
    try:
        raw, record, old = keys_ops.rotate_key(store, args.key_id, args.grace_hours)
    finally:
        store.close()
    intro = [f"rotated {old.key_id}: it stays valid until {_when(old.expires_at)}", "new key:"]
    _print_new_key(record, raw, intro)
    return 0


async def _serve(store: KeyStore, cfg: Config, host: str, port: int) -> None:
    assert cfg.tower.api_key is not None and cfg.tower.secret is not None
    local = cfg.tower.local
    app = create_tower_app(
        store,
        api_key=cfg.tower.api_key,
        secret=cfg.tower.secret,
        usage_flush_interval=local.usage_flush_interval if local else 5.0,
    )
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        for address in runner.addresses:
            print(f"tower listening on http://{address[0]}:{address[1]}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def _tower_serve(args: argparse.Namespace) -> int:
    cfg, local = _load(args)
    # The credentials other gateways must present to this tower (their own TOWER_API_KEY
    # and TOWER_SECRET).
    if not cfg.tower.api_key:
        raise ConfigError(
            "tower.api_key",
            "is not set: export TOWER_API_KEY, the key other gateways must send to this tower",
        )
    if not cfg.tower.secret:
        raise ConfigError(
            "tower.secret",
            "is not set: export TOWER_SECRET, the secret other gateways must send to this tower",
        )
    store = _open_store(local)
    try:
        asyncio.run(_serve(store, cfg, args.host, args.port))
    except OSError as exc:
        where = f"{args.host}:{args.port}"
        raise _Fail(EXIT_STORE, f"cannot listen on {where}: {exc.strerror}") from None
    finally:
        store.close()
    return 0


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="gateway.yaml (default: $TOWER_GATEWAY_CONFIG, then ./gateway.yaml)",
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `keys create|list|show|update|revoke|rotate` and `tower serve` to a command line."""
    keys = subparsers.add_parser("keys", help="manage keys in the embedded local tower")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)

    create = keys_sub.add_parser("create", help="create a key; prints it on the last line")
    _add_config(create)
    create.add_argument("--user-id", required=True, metavar="U")
    create.add_argument("--role", required=True, metavar="R")
    create.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="S",
        help="a scope granted to the key (repeatable)",
    )
    create.add_argument("--expires-in-days", type=float, default=None, metavar="N")
    create.add_argument("--env", choices=("test", "live"), default="test")
    create.add_argument(
        "--rate-limit",
        type=_number,
        default=None,
        metavar="N",
        help="requests per minute for this key",
    )
    create.add_argument("--team", default=None, metavar="T")
    create.set_defaults(func=_guarded(_create))

    listing = keys_sub.add_parser("list", help="list keys (never shows a key)")
    _add_config(listing)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=_guarded(_list))

    show = keys_sub.add_parser("show", help="one key and its use (never the key itself)")
    _add_config(show)
    show.add_argument("key_id", metavar="KEY_ID")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=_guarded(_show))

    update = keys_sub.add_parser("update", help="change a key's role, scopes, expiry or limits")
    _add_config(update)
    update.add_argument("key_id", metavar="KEY_ID")
    update.add_argument("--role", default=None, metavar="R")
    update.add_argument(
        "--scope",
        action="append",
        default=None,
        metavar="S",
        help="the key's scopes become exactly these (repeatable)",
    )
    expiry = update.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expires-in-days", type=float, default=None, metavar="N", help="expire N days from now"
    )
    expiry.add_argument("--never-expires", action="store_true")
    update.add_argument(
        "--rate-limit", type=_number, default=None, metavar="N", help="per minute; 0: the default"
    )
    update.add_argument("--team", default=None, metavar="T", help='"": no team')
    update.set_defaults(func=_guarded(_update))

    revoke = keys_sub.add_parser("revoke", help="refuse a key from now on")
    _add_config(revoke)
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.add_argument("--reason", default="revoked", metavar="R")
    revoke.set_defaults(func=_guarded(_revoke))

    rotate = keys_sub.add_parser("rotate", help="replace a key; prints the new one last")
    _add_config(rotate)
    rotate.add_argument("key_id", metavar="KEY_ID")
    rotate.add_argument(
        "--grace-hours",
        type=float,
        default=24.0,
        metavar="H",
        help="how long the old key stays valid (default 24)",
    )
    rotate.set_defaults(func=_guarded(_rotate))

    tower = subparsers.add_parser("tower", help="the embedded tower as a service")
    tower_sub = tower.add_subparsers(dest="tower_command", metavar="COMMAND", required=True)
    serve = tower_sub.add_parser("serve", help="serve /api/v1/validate for other gateways")
    _add_config(serve)
    serve.add_argument("--host", default=DEFAULT_TOWER_HOST, metavar="H")
    serve.add_argument("--port", type=int, default=DEFAULT_TOWER_PORT, metavar="P")
    serve.set_defaults(func=_guarded(_tower_serve))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tower-gateway")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    func: Command = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
