-- The AgentCore-compatible control plane (crates/berth-server/src/agentcore/).
-- Times are unix milliseconds; request JSON is the validated AgentCore wire shape.

-- One row per agent runtime (CreateAgentRuntime).
CREATE TABLE agentcore_runtimes (
    id          TEXT PRIMARY KEY,           -- agentRuntimeId, <name>-<10 chars>
    name        TEXT NOT NULL UNIQUE,       -- agentRuntimeName
    tags        TEXT NOT NULL,              -- JSON object
    created_at  INTEGER NOT NULL
);

-- Immutable versions: 1 from Create, one more per Update. Each READY version has a
-- native runtime named ac.<runtime id>.v<version>.
CREATE TABLE agentcore_versions (
    runtime_id      TEXT NOT NULL REFERENCES agentcore_runtimes(id) ON DELETE CASCADE,
    version         INTEGER NOT NULL,
    spec            TEXT NOT NULL,          -- validated request JSON (the RuntimeSpec members)
    status          TEXT NOT NULL,          -- CREATING, UPDATING, READY, CREATE_FAILED, UPDATE_FAILED
    failure_reason  TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (runtime_id, version)
);

-- Runtime endpoints. DEFAULT (pinned_version NULL) follows the latest version.
CREATE TABLE agentcore_endpoints (
    runtime_id      TEXT NOT NULL REFERENCES agentcore_runtimes(id) ON DELETE CASCADE,
    name            TEXT NOT NULL,
    id              TEXT NOT NULL UNIQUE,   -- <name>-<10 chars>
    pinned_version  INTEGER,                -- NULL: the runtime's latest version
    live_version    INTEGER,                -- the last READY version it served
    description     TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (runtime_id, name)
);

-- clientToken idempotency: the first successful response per (operation scope, token).
CREATE TABLE agentcore_client_tokens (
    scope           TEXT NOT NULL,          -- operation, plus the resource it acts on
    token           TEXT NOT NULL,
    request_sha256  TEXT NOT NULL,          -- of the canonical request parameters
    status          INTEGER NOT NULL,       -- HTTP status of the stored response
    response        TEXT NOT NULL,          -- JSON body of the stored response
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (scope, token)
);
