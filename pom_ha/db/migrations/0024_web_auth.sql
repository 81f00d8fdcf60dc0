-- The web console's and REST API's users, sessions, API tokens, login throttling and audit log
-- (pom_ha/web/auth.py, docs/console.md). Every server's web daemon reads these, so a session made on one
-- server is valid on the others and disabling a user takes effect everywhere on its next request.

CREATE TABLE IF NOT EXISTS web_users (
    name           text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$'),
    role           text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    password_hash  text NOT NULL,          -- argon2id (PHC string)
    disabled       boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- One row per login. ``id_hash`` is sha256 of the random session id the signed cookie carries.
CREATE TABLE IF NOT EXISTS web_sessions (
    id_hash     text PRIMARY KEY,
    user_name   text NOT NULL REFERENCES web_users(name) ON DELETE CASCADE,
    csrf        text NOT NULL,
    address     text NOT NULL DEFAULT '',
    server      text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    ended_at    timestamptz              -- logout (or disable): refused from then on
);
CREATE INDEX IF NOT EXISTS web_sessions_user ON web_sessions (user_name);

-- API tokens: shown once, stored as sha256 (they are 256-bit random). Their role is at most the user's.
CREATE TABLE IF NOT EXISTS api_tokens (
    id           bigserial PRIMARY KEY,
    user_name    text NOT NULL REFERENCES web_users(name) ON DELETE CASCADE,
    role         text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    token_hash   text NOT NULL UNIQUE,
    prefix       text NOT NULL,          -- the first characters, to tell tokens apart in lists
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz
);

-- Failed logins, per user and address: 5 in a minute -> 429 (shared by every server).
CREATE TABLE IF NOT EXISTS web_login_failures (
    user_name  text NOT NULL,
    address    text NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS web_login_failures_key ON web_login_failures (user_name, address, at);

-- Keys shared by every server's web daemon (the session cookie's HMAC key), made on first use.
CREATE TABLE IF NOT EXISTS web_secrets (
    name        text PRIMARY KEY,
    value       bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Who did what, when, from where, and the result. Never a password or a token.
CREATE TABLE IF NOT EXISTS audit_log (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor      text NOT NULL,            -- user name, 'token:<prefix>' appended in detail, or '-' (anonymous)
    role       text,
    via        text NOT NULL,            -- session | token | cli | anonymous
    address    text NOT NULL DEFAULT '',
    server     text NOT NULL DEFAULT '',
    action     text NOT NULL,            -- login, login_failed, login_throttled, logout, 'POST /v1/...', user_add ...
    target     text NOT NULL DEFAULT '',
    result     text NOT NULL,            -- ok | refused | error | HTTP status
    detail     jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at);
