//! `berth-bench`: start a real `berth server`, measure, print a markdown table.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = berth_bench::Args::parse();
    match berth_bench::main_exec(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
