//! The `berth` binary: CLI, `server`, and the hidden in-sandbox entry points.

mod cli;
mod cmd;
mod images;
mod terminal;
mod units;

use std::process::ExitCode;

use clap::Parser;

/// Exit code for failures of Berth itself (as opposed to the command's own exit code).
pub const EXIT_BERTH_ERROR: u8 = 125;

/// Dispatch hidden entry points before clap sees the arguments: they are not user
/// commands and parse their own flags.
pub fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The kernel starts the initramfs's `/init` (this binary) with arguments of its own
    // choosing; the VM's options come from /proc/cmdline instead.
    if args
        .first()
        .is_some_and(|argv0| berth_guest::agent::vm::is_vm_init(argv0))
    {
        berth_guest::agent::vm::main();
    }
    let first = args
        .get(1)
        .and_then(|a| a.to_str())
        .unwrap_or_default()
        .to_string();
    let hidden = match first.as_str() {
        "guest" => Some(berth_guest::agent::cli_main(args[2..].to_vec())),
        "sandbox-helper" => Some(berth_sandbox::helper::cli_main(args[2..].to_vec())),
        _ => None,
    };
    if let Some(result) = hidden {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("berth {first}: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = cli::Cli::parse();
    cmd::run(cli)
}
