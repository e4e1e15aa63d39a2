-- Berth state. Times are unix milliseconds.
CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY,
    sha256      TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE runtimes (
    name        TEXT PRIMARY KEY,
    spec        TEXT NOT NULL,          -- berth_api::RuntimeSpec as JSON
    created_at  INTEGER NOT NULL
);

CREATE TABLE sessions (
    id                  TEXT PRIMARY KEY,
    runtime             TEXT NOT NULL REFERENCES runtimes(name),
    state               TEXT NOT NULL,
    uid_slot            INTEGER NOT NULL UNIQUE,
    stop_reason         TEXT,
    cpu_ns              INTEGER NOT NULL DEFAULT 0,   -- sum over finished sandboxes
    peak_memory_bytes   INTEGER NOT NULL DEFAULT 0,   -- max over finished sandboxes
    workspace_bytes     INTEGER NOT NULL DEFAULT 0,   -- last measured
    created_at          INTEGER NOT NULL,
    last_activity_at    INTEGER NOT NULL,
    started_at          INTEGER
);
