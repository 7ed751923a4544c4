"""Station access: local users with roles, argon2id password hashes, sessions with CSRF tokens, login rate limit.

Roles are ordered: ``operator`` (view, review archived frames) < ``engineer`` (threshold, counters reset, teach,
swap) < ``admin`` (users). A session is a random token in an HttpOnly, SameSite=Strict cookie; every state-changing
request must also carry the session's CSRF token in the ``X-CSRF-Token`` header (the page reads it from a meta tag).
Sessions live in memory: a service restart logs everybody out.
"""

from __future__ import annotations

import collections
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

ROLES = ("operator", "engineer", "admin")
USER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MIN_PASSWORD = 8


class AuthError(ValueError):
    """A bad user-management request; the message says what is wrong."""


def role_rank(role: str) -> int:
    return ROLES.index(role)


class UserStore:
    """Users in SQLite (``users.sqlite3``): name, role, argon2id hash.

    Args:
        path: the SQLite file (created with mode 0600).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        path.chmod(0o600)
        self._db.execute("CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, role TEXT NOT NULL, "
                         "hash TEXT NOT NULL, created REAL NOT NULL)")  # fmt: skip
        self._lock = threading.Lock()
        self._ph = PasswordHasher()
        self._dummy: str | None = None  # verified against for unknown user names: same cost as a real check

    def add(self, name: str, role: str, password: str) -> None:
        """Create or replace a user. Raises :class:`AuthError` for a bad name, role or a short password."""
        if not USER_RE.match(name):
            raise AuthError(f"user name {name!r}: letters, digits, '_', '.', '-' (1-64)")
        if role not in ROLES:
            raise AuthError(f"role {role!r}: one of {', '.join(ROLES)}")
        if len(password) < MIN_PASSWORD:
            raise AuthError(f"password: at least {MIN_PASSWORD} characters")
        h = self._ph.hash(password)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO users VALUES (?, ?, ?, ?)", (name, role, h, time.time()))

    def delete(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0

    def role(self, name: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT role FROM users WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def all(self) -> list[dict[str, str]]:
        with self._lock:
            rows = self._db.execute("SELECT name, role FROM users ORDER BY name").fetchall()
        return [{"name": n, "role": r} for n, r in rows]

    def verify(self, name: str, password: str) -> str | None:
        """The user's role when the password matches, else ``None`` (same argon2 cost for unknown users)."""
        with self._lock:
            row = self._db.execute("SELECT role, hash FROM users WHERE name = ?", (name,)).fetchone()
        if row is not None:
            stored = str(row[1])
        else:
            if self._dummy is None:
                self._dummy = self._ph.hash(secrets.token_hex(16))
            stored = self._dummy
        try:
            self._ph.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        return row[0] if row else None

    def close(self) -> None:
        self._db.close()


@dataclass
class Session:
    user: str
    role: str
    csrf: str
    expires: float


class Sessions:
    """In-memory session table: token -> :class:`Session`."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._s: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, user: str, role: str) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        s = Session(user, role, secrets.token_urlsafe(32), time.monotonic() + self.ttl_s)
        with self._lock:
            self._s[token] = s
        return token, s

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            s = self._s.get(token)
            if s is not None and s.expires < time.monotonic():
                del self._s[token]
                s = None
        return s

    def drop(self, token: str | None) -> None:
        with self._lock:
            self._s.pop(token or "", None)

    def drop_user(self, user: str) -> None:
        with self._lock:
            for t in [t for t, s in self._s.items() if s.user == user]:
                del self._s[t]


class LoginLimiter:
    """At most ``max_failures`` failed logins per user name, and ``ADDR_FACTOR`` times that per client address
    (several people share a panel PC), in a sliding window of ``window_s``."""

    ADDR_FACTOR = 4

    def __init__(self, max_failures: int, window_s: float) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._fails: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> collections.deque[float]:
        d = self._fails[key]
        while d and now - d[0] > self.window_s:
            d.popleft()
        return d

    def retry_after(self, user: str, addr: str) -> float:
        """Seconds until a login for ``user`` from ``addr`` is allowed again (0: allowed now)."""
        now = time.monotonic()
        with self._lock:
            wait = 0.0
            for key, limit in ((f"u:{user}", self.max_failures), (f"a:{addr}", self.ADDR_FACTOR * self.max_failures)):
                d = self._recent(key, now)
                if len(d) >= limit:
                    wait = max(wait, self.window_s - (now - d[0]))
            return wait

    def failed(self, user: str, addr: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in (f"u:{user}", f"a:{addr}"):
                self._recent(key, now).append(now)

    def succeeded(self, user: str) -> None:
        with self._lock:
            self._fails.pop(f"u:{user}", None)
