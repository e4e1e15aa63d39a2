//! The `berth` binary: CLI, `server`, and the hidden in-sandbox entry points.

use std::process::ExitCode;

/// Dispatch hidden entry points before clap sees the arguments: they are not user
/// commands and parse their own flags.
pub fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let hidden = args
        .get(1)
        .and_then(|a| a.to_str())
        .unwrap_or_default()
        .to_string();
    let result = match hidden.as_str() {
        "guest" => berth_guest::agent::cli_main(args[2..].to_vec()),
        "sandbox-helper" => berth_sandbox::helper::cli_main(args[2..].to_vec()),
        _ => {
            eprintln!("berth: CLI not built yet");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("berth {hidden}: {err:#}");
            ExitCode::FAILURE
        }
    }
}
