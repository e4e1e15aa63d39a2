//! Retired: shell recordings are written by the host (`berth-core`, `recordings.rs`),
//! outside the sandbox, from a `recorder` attachment to each shell.
// TODO(recordings): delete this file together with its `mod recording;` line in
// agent/mod.rs.
