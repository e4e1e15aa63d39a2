-- AgentCore versions deployed from container images (agentRuntimeArtifact.containerConfiguration).
-- The unpacked image lives in the server's image cache, keyed by the manifest digest; a
-- cached image no row names any more is removed.
CREATE TABLE agentcore_version_images (
    runtime_id  TEXT NOT NULL,
    version     INTEGER NOT NULL,
    reference   TEXT NOT NULL,          -- containerUri as given
    digest      TEXT NOT NULL,          -- the image manifest's digest (sha256:…), the cache key
    config      TEXT NOT NULL,          -- JSON: entrypoint, cmd, env, working_dir, user, exposed_ports
    PRIMARY KEY (runtime_id, version),
    FOREIGN KEY (runtime_id, version) REFERENCES agentcore_versions(runtime_id, version)
        ON DELETE CASCADE
);
CREATE INDEX agentcore_version_images_digest ON agentcore_version_images(digest);
