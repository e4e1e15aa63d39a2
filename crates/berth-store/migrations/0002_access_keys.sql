-- Access keys for SigV4 clients of the AgentCore-compatible API. Verifying a signature
-- needs the secret itself, so it cannot be stored as a hash: it is sealed with
-- AES-256-GCM (associated data: the key id) under <data-dir>/keys/access-keys.key, which
-- never enters this database. Times are unix milliseconds.
CREATE TABLE access_keys (
    id                  TEXT PRIMARY KEY,       -- BKIA + 16 upper-case letters and digits
    name                TEXT,
    secret_nonce        BLOB NOT NULL,          -- 12 random bytes
    secret_ciphertext   BLOB NOT NULL,          -- sealed secret followed by the GCM tag
    created_at          INTEGER NOT NULL,
    last_used_at        INTEGER
);
