//! One module per subcommand; each returns the process exit code.

mod access_key;
mod admin;
mod cp;
mod drivers;
mod exec;
mod image;
mod server;
mod shell;

use std::process::ExitCode;

use anyhow::Context;

use crate::cli::{Cli, Command, Remote};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/berth";

pub fn run(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berth: cannot start the async runtime: {e}");
            return ExitCode::from(crate::EXIT_BERTH_ERROR);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Server(args) => server::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Exec(args) if args.it => shell::interactive(args).await,
            Command::Exec(args) => exec::run(args).await,
            Command::Cp(args) => cp::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Runtime(cmd) => admin::runtime(cmd).await.map(|()| ExitCode::SUCCESS),
            Command::Session(cmd) => admin::session(cmd).await.map(|()| ExitCode::SUCCESS),
            Command::Shell(cmd) => shell::command(cmd).await.map(|()| ExitCode::SUCCESS),
            Command::Image(cmd) => image::run(cmd).await.map(|()| ExitCode::SUCCESS),
            Command::AccessKey(cmd) => access_key::run(cmd).await.map(|()| ExitCode::SUCCESS),
        }
    });
    // Background tasks (e.g. a reader blocked on stdin) must not keep the process alive.
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("berth: {}", one_line(&err));
            ExitCode::from(crate::EXIT_BERTH_ERROR)
        }
    }
}

/// The error chain on one line, outermost first.
fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// A client for the server named by `--url`, with the token from `--token`,
/// `BERTH_TOKEN` or `<data-dir>/admin.token`.
pub fn client(remote: &Remote) -> anyhow::Result<berth_client::Client> {
    let token = match &remote.token {
        Some(t) => t.clone(),
        None => {
            let path = remote.data_dir.join("admin.token");
            std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "no API token: set BERTH_TOKEN, or make {} readable (it is written by `berth server`)",
                    path.display()
                )
            })?
        }
    };
    Ok(berth_client::Client::new(&remote.url, &token))
}

/// Turn client errors into one actionable line.
pub fn explain(err: berth_client::ClientError) -> anyhow::Error {
    match &err {
        berth_client::ClientError::Connect { url, .. } => {
            anyhow::anyhow!("cannot reach the Berth server at {url}; start it with `berth server` or set BERTH_URL")
        }
        _ => anyhow::Error::new(err),
    }
}

/// Parse `K=V` pairs.
pub fn parse_env(
    pairs: &[String],
    flag: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow::anyhow!("{flag} {p:?}: expected K=V"))
        })
        .collect()
}
