//! `berth sandbox-helper`: a short-lived, single-threaded process that drives libcontainer.
//!
//! libcontainer forks and clones; doing that inside the multi-threaded server is unsafe
//! (only the forking thread survives in the child, locks held by other threads stay
//! locked forever). The driver therefore runs `berth sandbox-helper <subcommand>` and
//! waits for it. See [`crate::namespace::helper`] for the subcommands.

pub fn cli_main(args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    crate::namespace::helper::main(args)
}
