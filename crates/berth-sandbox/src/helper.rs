//! `berth sandbox-helper`: a short-lived, single-threaded process that drives libcontainer.

pub fn cli_main(_args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    anyhow::bail!("sandbox helper not built yet")
}
