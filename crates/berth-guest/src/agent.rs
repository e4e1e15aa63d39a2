//! The guest agent process.

/// `berth guest [--listen SOCKET]`.
pub fn cli_main(_args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    anyhow::bail!("guest agent not built yet")
}
