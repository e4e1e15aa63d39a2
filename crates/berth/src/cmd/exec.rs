use std::process::ExitCode;

use anyhow::Context;
use base64::Engine;
use berth_api::{CommandEvent, CommandRequest};
use berth_client::RawEvent;
use futures::StreamExt;
use tokio::io::AsyncReadExt;

use crate::cli::ExecArgs;
use crate::cmd::{client, explain, parse_env};

/// Ctrl+C presses after which the CLI gives up waiting and leaves (which kills the command).
const CTRL_C_LIMIT: u32 = 3;

pub async fn run(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let client = client(&args.remote)?;
    let stdin_b64 = if args.stdin {
        let mut buf = Vec::new();
        tokio::io::stdin()
            .read_to_end(&mut buf)
            .await
            .context("cannot read standard input")?;
        Some(base64::engine::general_purpose::STANDARD.encode(buf))
    } else {
        None
    };
    let req = CommandRequest {
        argv: Some(args.argv.clone()),
        cwd: args.cwd.clone(),
        env: parse_env(&args.env, "--env")?,
        timeout_s: args.timeout.map(|t| t as f64),
        stdin_b64,
        runtime: args.runtime.clone(),
        ..Default::default()
    };
    // Register for SIGINT before anything runs remotely, so that a Ctrl+C at any point
    // is forwarded rather than killing the CLI (and with it, by hang-up, the command).
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("cannot handle Ctrl+C")?;
    let mut events = client
        .run_command_raw(&args.session, &req)
        .await
        .map_err(explain)?;
    let mut command_id: Option<String> = None;
    let mut ctrl_c = 0u32;
    loop {
        let event = tokio::select! {
            ev = events.next() => ev,
            _ = interrupts.recv() => {
                ctrl_c += 1;
                if ctrl_c >= CTRL_C_LIMIT {
                    anyhow::bail!("interrupted; the command was killed");
                }
                if let Some(id) = &command_id {
                    // Forward as SIGINT to the remote process group, like a local terminal.
                    if let Err(e) = client.signal_command(&args.session, id, "INT").await {
                        eprintln!("berth: cannot forward Ctrl+C: {e}");
                    }
                }
                continue;
            }
        };
        let Some(event) = event else {
            anyhow::bail!("the server ended the command stream without an exit status");
        };
        match event.map_err(explain)? {
            RawEvent::Stdout(bytes) => {
                crate::terminal::write_fd(&std::io::stdout(), &bytes)
                    .context("cannot write standard output")?;
            }
            RawEvent::Stderr(bytes) => {
                crate::terminal::write_fd(&std::io::stderr(), &bytes)
                    .context("cannot write standard error")?;
            }
            RawEvent::Event(CommandEvent::Started { command_id: id, .. }) => command_id = Some(id),
            RawEvent::Event(CommandEvent::Exit {
                code,
                signal,
                timed_out,
                ..
            }) => {
                if timed_out {
                    eprintln!(
                        "berth: command timed out after {}s and was killed",
                        args.timeout.unwrap_or(0)
                    );
                }
                let status = match (code, signal) {
                    (Some(c), _) => c,
                    (None, Some(s)) => 128 + s,
                    (None, None) => 1,
                };
                return Ok(ExitCode::from(u8::try_from(status & 0xff).unwrap_or(1)));
            }
            RawEvent::Event(CommandEvent::Error { error }) => anyhow::bail!("{}", error.message),
            // Output never arrives as JSON on the frame stream.
            RawEvent::Event(CommandEvent::Stdout { .. } | CommandEvent::Stderr { .. }) => {}
        }
    }
}
