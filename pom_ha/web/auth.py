"""Users, sessions, API tokens, login throttling and the audit log of the console and the REST API.

Everything lives in PostgreSQL (migration 0024), so every server's web daemon sees the same users and
sessions: a session made on pom1 is valid on pom2, and a user disabled on one is refused by all on the
next request (every request reads its session or token row; nothing is cached).

* Passwords: argon2id (argon2-cffi's defaults). Never logged, never in the audit log.
* Sessions: a random 256-bit id; the cookie carries ``<id>.<HMAC-SHA256>`` keyed by a secret kept in
  ``web_secrets`` (made by the first daemon that needs it); the table keeps sha256(id) only.
* API tokens: ``pomt_<random>``, shown once; the table keeps sha256 (a 256-bit random secret needs no
  slow hash). A token's role is at most its user's role, checked at every use.
* Throttling: :data:`MAX_FAILURES` wrong passwords per user and address within :data:`FAILURE_WINDOW_S`
  -> refused (429) without checking the password.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")
RANK = {r: i for i, r in enumerate(ROLES)}
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
TOKEN_PREFIX = "pomt_"
MAX_FAILURES = 5
FAILURE_WINDOW_S = 60.0
DEFAULT_SESSION_TTL_S = 8 * 3600.0
MIN_PASSWORD_LEN = 8
_hasher = PasswordHasher()  # argon2id
# verified when the user does not exist, so an unknown name costs the same time as a wrong password
_DUMMY_HASH = _hasher.hash("not-a-real-password")


class AuthError(Exception):
    """A refused user/token operation (bad name, role, password); the message says why."""


@dataclass(frozen=True)
class Identity:
    """Who made a request: a user by session or by token (``via``), with the role in force."""

    user: str
    role: Role
    via: Literal["session", "token", "open"]
    session_hash: str | None = None
    csrf: str | None = None
    token_prefix: str | None = None

    def allows(self, needed: Role) -> bool:
        return RANK[self.role] >= RANK[needed]


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password_policy(password: str) -> None:
    if len(password) < MIN_PASSWORD_LEN:
        raise AuthError(f"the password needs at least {MIN_PASSWORD_LEN} characters")
    if len(password) > 1024:
        raise AuthError("the password is longer than 1024 characters")


def check_user_name(name: str) -> str:
    if not USER_NAME.match(name):
        raise AuthError(f"user name {name!r} must be 1-64 of A-Z a-z 0-9 _ . @ - (starting with a letter or digit)")
    return name


def check_role(role: str) -> Role:
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return role  # type: ignore[return-value,unused-ignore]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---- users -------------------------------------------------------------------------------------------------
async def add_user(conn: asyncpg.Connection, name: str, role: str, password: str) -> None:
    check_user_name(name)
    check_role(role)
    check_password_policy(password)
    try:
        await conn.execute("INSERT INTO web_users (name, role, password_hash) VALUES ($1, $2, $3)",
                           name, role, hash_password(password))
    except asyncpg.UniqueViolationError:
        raise AuthError(f"user {name!r} already exists") from None


async def set_disabled(conn: asyncpg.Connection, name: str, disabled: bool) -> None:
    """Disable (or enable) a user; a disable ends the user's sessions at once, on every server."""
    async with conn.transaction():
        done = await conn.execute("UPDATE web_users SET disabled = $2, updated_at = now() WHERE name = $1",
                                  name, disabled)
        if done == "UPDATE 0":
            raise AuthError(f"no user {name!r}")
        if disabled:
            await conn.execute("UPDATE web_sessions SET ended_at = now() WHERE user_name = $1 AND ended_at IS NULL",
                               name)


async def set_password(conn: asyncpg.Connection, name: str, password: str) -> None:
    check_password_policy(password)
    done = await conn.execute("UPDATE web_users SET password_hash = $2, updated_at = now() WHERE name = $1",
                              name, hash_password(password))
    if done == "UPDATE 0":
        raise AuthError(f"no user {name!r}")


async def list_users(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT name, role, disabled, created_at FROM web_users ORDER BY name")
    return [dict(r) for r in rows]


# ---- tokens ------------------------------------------------------------------------------------------------
async def create_token(conn: asyncpg.Connection, user: str, role: str, *, ttl_days: float | None = None) -> str:
    """A new token (returned once; only its hash is kept). Its role may not exceed the user's."""
    check_role(role)
    row = await conn.fetchrow("SELECT role, disabled FROM web_users WHERE name = $1", user)
    if row is None:
        raise AuthError(f"no user {user!r}")
    if row["disabled"]:
        raise AuthError(f"user {user!r} is disabled")
    if RANK[role] > RANK[row["role"]]:  # type: ignore[index]
        raise AuthError(f"a token's role cannot exceed its user's: {user} is {row['role']}, asked {role}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO api_tokens (user_name, role, token_hash, prefix, expires_at) VALUES ($1, $2, $3, $4,"
        " CASE WHEN $5::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $5::float8 * 86400) END)",
        user, role, sha256(token), token[:12], ttl_days)
    return token


async def token_identity(conn: asyncpg.Connection, token: str) -> Identity | None:
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    row = await conn.fetchrow(
        "SELECT t.id, t.user_name, t.role AS token_role, u.role AS user_role, t.prefix,"
        " (t.last_used_at IS NULL OR t.last_used_at < now() - interval '60 seconds') AS touch"
        " FROM api_tokens t JOIN web_users u ON u.name = t.user_name"
        " WHERE t.token_hash = $1 AND NOT u.disabled AND t.revoked_at IS NULL"
        "   AND (t.expires_at IS NULL OR t.expires_at > now())", sha256(token))
    if row is None:
        return None
    if row["touch"]:  # last use, to the minute (not a write per request)
        await conn.execute("UPDATE api_tokens SET last_used_at = now() WHERE id = $1", row["id"])
    role = min(row["token_role"], row["user_role"], key=lambda r: RANK[r])
    return Identity(row["user_name"], role, "token", token_prefix=row["prefix"])


async def revoke_token(conn: asyncpg.Connection, prefix: str) -> int:
    done = await conn.execute("UPDATE api_tokens SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL",
                              prefix)
    return int(done.split()[-1])


# ---- sessions ----------------------------------------------------------------------------------------------
async def cookie_key(conn: asyncpg.Connection) -> bytes:
    """The HMAC key of the session cookie, the same on every server (made once, by whoever comes first)."""
    await conn.execute("INSERT INTO web_secrets (name, value) VALUES ('session_cookie', $1) ON CONFLICT DO NOTHING",
                       secrets.token_bytes(32))
    value: bytes = await conn.fetchval("SELECT value FROM web_secrets WHERE name = 'session_cookie'")
    return value


def sign(key: bytes, session_id: str) -> str:
    mac = hmac.new(key, session_id.encode(), hashlib.sha256).hexdigest()
    return f"{session_id}.{mac}"


def unsign(key: bytes, cookie: str) -> str | None:
    session_id, _, mac = cookie.rpartition(".")
    if not session_id or len(cookie) > 300:
        return None
    good = hmac.new(key, session_id.encode(), hashlib.sha256).hexdigest()
    return session_id if hmac.compare_digest(good, mac) else None


@dataclass(frozen=True)
class LoginResult:
    ok: bool
    throttled: bool = False
    session_id: str | None = None
    role: Role | None = None
    reason: str = ""


async def login(conn: asyncpg.Connection, user: str, password: str, *, address: str, server: str,
                ttl_s: float = DEFAULT_SESSION_TTL_S) -> LoginResult:
    """Check the password (unless throttled) and open a session. Failures are recorded for throttling."""
    failures = await conn.fetchval(
        "SELECT count(*) FROM web_login_failures WHERE user_name = $1 AND address = $2"
        " AND at > now() - make_interval(secs => $3::float8)", user[:100], address, FAILURE_WINDOW_S)
    if failures >= MAX_FAILURES:
        return LoginResult(False, throttled=True, reason=f"{failures} failed logins in the last minute")
    row = await conn.fetchrow("SELECT role, password_hash, disabled FROM web_users WHERE name = $1", user)
    ok = False
    try:
        ok = _hasher.verify(row["password_hash"] if row else _DUMMY_HASH, password) and row is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        ok = False
    if not ok or row is None or row["disabled"]:
        await conn.execute("INSERT INTO web_login_failures (user_name, address) VALUES ($1, $2)", user[:100], address)
        await conn.execute("DELETE FROM web_login_failures WHERE at < now() - interval '1 hour'")
        return LoginResult(False, reason="disabled" if ok and row is not None else "wrong user or password")
    if _hasher.check_needs_rehash(row["password_hash"]):
        await conn.execute("UPDATE web_users SET password_hash = $2 WHERE name = $1", user, hash_password(password))
    session_id = secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO web_sessions (id_hash, user_name, csrf, address, server, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6::float8))",
        sha256(session_id), user, secrets.token_urlsafe(24), address, server, ttl_s)
    return LoginResult(True, session_id=session_id, role=row["role"])


async def session_identity(conn: asyncpg.Connection, session_id: str) -> Identity | None:
    row = await conn.fetchrow(
        "SELECT s.user_name, u.role, s.csrf, s.last_seen < now() - interval '60 seconds' AS touch"
        " FROM web_sessions s JOIN web_users u ON u.name = s.user_name"
        " WHERE s.id_hash = $1 AND NOT u.disabled AND s.ended_at IS NULL AND s.expires_at > now()",
        sha256(session_id))
    if row is None:
        return None
    if row["touch"]:
        await conn.execute("UPDATE web_sessions SET last_seen = now() WHERE id_hash = $1", sha256(session_id))
    return Identity(row["user_name"], row["role"], "session", session_hash=sha256(session_id), csrf=row["csrf"])


async def logout(conn: asyncpg.Connection, session_hash: str) -> None:
    await conn.execute("UPDATE web_sessions SET ended_at = now() WHERE id_hash = $1 AND ended_at IS NULL",
                       session_hash)


# ---- audit -------------------------------------------------------------------------------------------------
async def audit(conn: asyncpg.Connection, *, actor: str, role: str | None, via: str, address: str, server: str,
                action: str, target: str = "", result: str, detail: dict[str, Any] | None = None) -> None:
    await conn.execute(
        "INSERT INTO audit_log (actor, role, via, address, server, action, target, result, detail)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)",
        actor[:100], role, via, address[:100], server, action[:200], target[:200], result[:100],
        json.dumps(detail or {}, default=str))
