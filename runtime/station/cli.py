"""``rdedge station user add|list|delete``: manage the station page's local users (no torch, no web server).

The password comes from ``--password-stdin`` (one line; for provisioning scripts) or an interactive prompt; it is
never an argument (it would show in ``ps`` and the shell history).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.errors import ConfigError

if TYPE_CHECKING:
    from runtime.config import RuntimeConfig
    from runtime.station.auth import UserStore


def _users(config: Path) -> tuple[UserStore, RuntimeConfig]:
    from runtime.config import load_config
    from runtime.station import require_ui

    require_ui()
    from runtime.station.auth import UserStore

    cfg = load_config(config)
    return UserStore(cfg.ui.state_dir / "users.sqlite3"), cfg


def _cmd_add(args: argparse.Namespace) -> int:
    from runtime.station.audit import AuditLog
    from runtime.station.auth import AuthError

    users, cfg = _users(args.config)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise ConfigError("the two passwords differ")
    old = users.role(args.name)
    try:
        users.add(args.name, args.role, password)
    except AuthError as exc:
        raise ConfigError(str(exc)) from None
    AuditLog(cfg.ui.state_dir / "audit.sqlite3").record("cli", "user_set", args.name, old, args.role)
    print(f"user {args.name}: {args.role}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    users, _ = _users(args.config)
    print(json.dumps(users.all(), indent=2))
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    from runtime.station.audit import AuditLog

    users, cfg = _users(args.config)
    old = users.role(args.name)
    if old is None:
        raise ConfigError(f"no user {args.name!r}")
    users.delete(args.name)
    AuditLog(cfg.ui.state_dir / "audit.sqlite3").record("cli", "user_delete", args.name, old, None)
    print(f"user {args.name} deleted")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``station`` to the ``rdedge`` parser."""
    p = sub.add_parser("station", help="station page users (rdedge[ui]); the page itself runs in 'rdedge run'")
    ssub = p.add_subparsers(dest="station_verb", metavar="STATION_VERB", required=True)
    u = ssub.add_parser("user", help="add, list or delete local users")
    usub = u.add_subparsers(dest="user_verb", metavar="USER_VERB", required=True)
    q = usub.add_parser("add", help="create a user or change its role and password")
    q.add_argument("name")
    q.add_argument("--role", required=True, choices=["operator", "engineer", "admin"])
    q.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    q.add_argument("--config", required=True, type=Path, help="runtime config YAML (its ui.state_dir is used)")
    q.set_defaults(func=_cmd_add)
    q = usub.add_parser("list", help="print users and roles as JSON")
    q.add_argument("--config", required=True, type=Path)
    q.set_defaults(func=_cmd_list)
    q = usub.add_parser("delete", help="delete a user (its sessions end at its next request)")
    q.add_argument("name")
    q.add_argument("--config", required=True, type=Path)
    q.set_defaults(func=_cmd_delete)
