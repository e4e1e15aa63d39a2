//! The benchmark harness behind `berth-bench`: it starts a real `berth server` on a
//! fresh temporary data dir, runs the benchmarks of issue 2 against it over the native
//! API (and the CLI for one reference figure) and those of issue 3 over the shell attach
//! WebSocket (`--only shells`) and, only when asked for with `--only microvm`, those of
//! issue 4 (microVM image build, boot, first output, memory overhead); it deletes every
//! session it made, stops the server with SIGTERM and checks that nothing was left
//! behind.
//!
//! Results are printed as a markdown table; `--json` also writes them as JSON.
//! `docs/benchmarks.md` records runs on a real machine.

mod benches;
pub mod host;
mod microvm;
pub mod report;
mod server;
mod shells;
pub mod stats;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::StreamExt;

use crate::report::Report;
use crate::server::Server;

const ALL: &[&str] = &[
    "new",
    "rtt",
    "resume",
    "throughput",
    "memory",
    "concurrency",
    "shells",
    "microvm",
];

/// Benchmarks left out when `--only` is not given: `microvm` builds a 3 GiB guest image
/// (and downloads a kernel) and boots ~30 VMs, minutes under TCG, where the default set
/// takes under a minute.
const OPT_IN: &[&str] = &["microvm"];

/// Measure Berth against a real server started on a temporary data dir (needs root).
#[derive(Debug, Clone, Parser)]
#[command(name = "berth-bench", version, max_term_width = 100)]
pub struct Args {
    /// The berth binary to start as the server (and to run for the CLI figure).
    #[arg(long, default_value = "target/release/berth")]
    pub berth: PathBuf,
    /// Measured runs of each latency benchmark (new session, round trip, resume).
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
    /// Pause before each new-session run, so the driver can refill its spare workspace
    /// images (0 = back to back, the default).
    #[arg(long, default_value_t = 0)]
    pub new_gap_ms: u64,
    /// Keep each new session running until the new-session benchmark ends instead of
    /// deleting it before the next run: starts come closer together (and the host fills
    /// up with idle sandboxes), which tests whether the spare workspace pool keeps up.
    #[arg(long)]
    pub new_keep: bool,
    /// Unmeasured runs before each latency benchmark.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Bytes of `head -c N /dev/zero` per throughput run (suffixes K, M, G = powers of 1024).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub throughput_bytes: u64,
    /// Runs of each throughput path (NDJSON, frames, CLI; interleaved); the median is
    /// reported.
    #[arg(long, default_value_t = 5)]
    pub throughput_runs: usize,
    /// Idle sandboxes started for the memory figure.
    #[arg(long, default_value_t = 20)]
    pub memory_sandboxes: usize,
    /// Seconds to let the idle sandboxes settle before reading their memory.
    #[arg(long, default_value_t = 2)]
    pub memory_settle_s: u64,
    /// Sessions running commands at once in the concurrency benchmark.
    #[arg(long, default_value_t = 100)]
    pub concurrent_sessions: usize,
    /// Commands (`echo hi`) each concurrent session runs, one after another.
    #[arg(long, default_value_t = 5)]
    pub commands_per_session: usize,
    /// Passed to `berth server --max-sandboxes`; must exceed --concurrent-sessions.
    #[arg(long, default_value_t = 128)]
    pub max_sandboxes: usize,
    /// Keystroke echo round trips measured (after --echo-warmup unmeasured ones).
    #[arg(long, default_value_t = 2000)]
    pub echo_runs: usize,
    /// Unmeasured keystroke echo round trips first.
    #[arg(long, default_value_t = 200)]
    pub echo_warmup: usize,
    /// Measured reattaches (snapshot of a full screen after 256 KiB of output).
    #[arg(long, default_value_t = 100)]
    pub reattach_runs: usize,
    /// Shells attached and streaming at once (one session; the server gets
    /// `--max-shells` this + 2).
    #[arg(long, default_value_t = 50)]
    pub shell_streams: usize,
    /// Lines (`seq 1 N`) each streaming shell prints.
    #[arg(long, default_value_t = 20000)]
    pub shell_lines: u64,
    /// Measured new microVM sessions (`--only microvm`), after --warmup unmeasured ones.
    #[arg(long, default_value_t = 20)]
    pub vm_runs: usize,
    /// Guest RAM of the microVM runtime (`--memory`; K/M/G suffixes).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub vm_memory: u64,
    /// Idle microVMs started for the memory overhead figure.
    #[arg(long, default_value_t = 5)]
    pub vm_idle: usize,
    /// Seconds to let the idle microVMs settle before reading their memory.
    #[arg(long, default_value_t = 5)]
    pub vm_settle_s: u64,
    /// Use the guest images already built in this data dir (`--guest-images` of the
    /// server) instead of building them, and skip the image build figures.
    #[arg(long, value_name = "DIR")]
    pub guest_images: Option<PathBuf>,
    /// Passed to `berth server --microvm-accel` (auto, kvm or tcg); the server's own
    /// default (auto: KVM when it boots the guest, else TCG) when absent.
    #[arg(long)]
    pub microvm_accel: Option<String>,
    /// Comma-separated subset of: new, rtt, resume, throughput, memory, concurrency,
    /// shells, microvm. Default: all but microvm.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Skip the `berth exec … > /dev/null` throughput figure.
    #[arg(long)]
    pub skip_cli: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Copy the server's log here when it stops (the temp dir is removed).
    #[arg(long)]
    pub server_log: Option<PathBuf>,
    /// Where the temporary data dir goes.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    pub tmp_dir: PathBuf,
}

impl Args {
    /// Whether benchmark `name` runs: listed in `--only`, or `--only` absent and the
    /// benchmark not opt-in.
    pub fn enabled(&self, name: &str) -> bool {
        if self.only.is_empty() {
            !OPT_IN.contains(&name)
        } else {
            self.only.iter().any(|o| o == name)
        }
    }
}

/// Parse `1G`, `512M`, `4096` (K/M/G are powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("unknown size suffix in {s:?}; use K, M or G")),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 1G or 4096"))?;
    n.checked_mul(mult)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("size {s:?} is zero or too large"))
}

/// What every benchmark gets.
pub(crate) struct Ctx {
    pub args: Args,
    pub client: berth_client::Client,
    pub http: reqwest::Client,
    pub url: String,
    pub token: String,
    pub server_pid: Option<u32>,
    /// Prefix of every session id this run makes: sandbox cgroups are named after the
    /// session id alone, so ids must not collide with other servers on the host.
    pub prefix: String,
    /// Sessions made and not yet deleted.
    pub live: Arc<Mutex<BTreeSet<String>>>,
    /// Per-server cgroup parents (`berth/<server>`) seen holding this run's sandboxes;
    /// the driver removes each with its last sandbox, so none may outlive the server.
    pub cgroup_parents: Arc<Mutex<BTreeSet<String>>>,
}

impl Ctx {
    pub fn session(&self, name: &str) -> String {
        let id = format!("{}{name}", self.prefix);
        if let Ok(mut live) = self.live.lock() {
            live.insert(id.clone());
        }
        id
    }

    /// Remember the cgroup parent of a running session's sandbox for the leak check.
    pub fn observe_cgroup(&self, id: &str) {
        if let (Some(parent), Ok(mut seen)) = (host::cgroup_parent(id), self.cgroup_parents.lock())
        {
            seen.insert(parent);
        }
    }

    pub async fn delete(&self, id: &str) -> Result<()> {
        self.client
            .delete_session(id)
            .await
            .with_context(|| format!("cannot delete session {id}"))?;
        if let Ok(mut live) = self.live.lock() {
            live.remove(id);
        }
        Ok(())
    }

    /// Delete every session still recorded, eight at a time.
    pub async fn delete_all(&self) -> Vec<String> {
        let ids: Vec<String> = self
            .live
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default();
        let results: Vec<(String, Result<()>)> = futures::stream::iter(ids)
            .map(|id| async move {
                let r = self.delete(&id).await;
                (id, r)
            })
            .buffer_unordered(8)
            .collect()
            .await;
        results
            .into_iter()
            .filter_map(|(id, r)| match r {
                Err(e)
                    if e.downcast_ref::<berth_client::ClientError>()
                        .and_then(berth_client::ClientError::code)
                        == Some(berth_api::ErrorCode::NotFound) =>
                {
                    None
                }
                Err(e) => Some(format!("{id}: {e:#}")),
                Ok(()) => None,
            })
            .collect()
    }

    pub fn enabled(&self, name: &str) -> bool {
        self.args.enabled(name)
    }
}

pub fn main_exec(args: Args) -> Result<()> {
    for o in &args.only {
        if !ALL.contains(&o.as_str()) {
            bail!("--only {o:?} is not one of {}", ALL.join(", "));
        }
    }
    if args.runs == 0 || args.throughput_runs == 0 {
        bail!("--runs and --throughput-runs must be at least 1");
    }
    if args.echo_runs == 0
        || args.reattach_runs == 0
        || args.shell_streams == 0
        || args.shell_lines == 0
    {
        bail!("--echo-runs, --reattach-runs, --shell-streams and --shell-lines must be at least 1");
    }
    if args.vm_runs == 0 || args.vm_idle == 0 {
        bail!("--vm-runs and --vm-idle must be at least 1");
    }
    let needed = args
        .concurrent_sessions
        .max(args.memory_sandboxes)
        .max(args.vm_idle)
        .max(if args.new_keep {
            args.runs + args.warmup
        } else {
            0
        })
        + 1;
    if args.max_sandboxes < needed {
        bail!(
            "--max-sandboxes {} is below the sandboxes this run needs ({needed})",
            args.max_sandboxes
        );
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("berth server needs root; run berth-bench as root");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let machine = host::Machine::probe();
    let date_utc = utc_now();
    let mut figures = Vec::new();
    let mut notes = Vec::new();
    // The guest images exist before the server starts; a built temp dir is removed
    // when `images` drops, after the server has stopped.
    let images = if args.enabled("microvm") {
        Some(microvm::images(&args, &mut figures, &mut notes).await?)
    } else {
        None
    };
    let mut server = Server::start(
        &args.berth,
        args.max_sandboxes,
        args.shell_streams + 2,
        &args.tmp_dir,
        images.as_ref().map(microvm::Images::dir),
        args.microvm_accel.as_deref(),
    )
    .await?;
    eprintln!(
        "berth-bench: server {} (pid {:?}, log {})",
        server.url,
        server.pid(),
        server.log.display()
    );
    let ctx = Ctx {
        client: berth_client::Client::new(&server.url, &server.token),
        http: reqwest::Client::new(),
        url: server.url.clone(),
        token: server.token.clone(),
        server_pid: server.pid(),
        prefix: format!("bench{}-", std::process::id()),
        live: Arc::new(Mutex::new(BTreeSet::new())),
        cgroup_parents: Arc::new(Mutex::new(BTreeSet::new())),
        args: args.clone(),
    };
    let info: serde_json::Value = ctx
        .http
        .get(format!("{}/v1/info", ctx.url))
        .bearer_auth(&ctx.token)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .context("GET /v1/info failed")?
        .json()
        .await
        .context("GET /v1/info sent bad JSON")?;

    let outcome = benches::run_all(&ctx, &server, &mut figures, &mut notes).await;

    let undeleted = ctx.delete_all().await;
    if !undeleted.is_empty() {
        notes.push(format!("sessions that could not be deleted: {undeleted:?}"));
    }
    let stop = server.shutdown();
    drop(images);
    let server_log = server.final_log.clone();
    if let Some(path) = &args.server_log {
        if let Err(e) = std::fs::write(path, &server_log) {
            notes.push(format!(
                "cannot write the server log to {}: {e}",
                path.display()
            ));
        }
    }
    let parents: Vec<String> = ctx
        .cgroup_parents
        .lock()
        .map(|p| p.iter().cloned().collect())
        .unwrap_or_default();
    let leaked = leaked_cgroups(&ctx.prefix, &parents);
    if !leaked.is_empty() {
        notes.push(format!("cgroups left after server stop: {leaked:?}"));
    }

    let report = Report {
        date_utc,
        machine,
        berth_version: info["version"].as_str().unwrap_or("?").to_string(),
        driver: info["driver"].as_str().unwrap_or("?").to_string(),
        command_line: std::env::args().collect(),
        figures,
        notes,
    };
    println!("{}", report.markdown());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).context("cannot encode the report")?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    outcome?;
    stop.context("stopping the server")?;
    if !undeleted.is_empty() || !leaked.is_empty() {
        bail!("clean-up failed; see the notes above");
    }
    Ok(())
}

/// Cgroup directories of this run's sessions, and the per-server parents that held
/// them, that outlived the server.
fn leaked_cgroups(prefix: &str, parents: &[String]) -> Vec<PathBuf> {
    let mut left = host::cgroups_with_prefix(prefix);
    for parent in parents {
        left.extend(host::cgroup_dirs_named(parent));
    }
    left.sort();
    left.dedup();
    left
}

/// `YYYY-MM-DDTHH:MM:SSZ` from the system clock.
fn utc_now() -> String {
    chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now())
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1T").is_err());
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn microvm_is_opt_in() {
        let args = |only: &[&str]| {
            let mut argv = vec!["berth-bench"];
            if !only.is_empty() {
                argv.push("--only");
            }
            let joined = only.join(",");
            if !only.is_empty() {
                argv.push(&joined);
            }
            Args::parse_from(argv)
        };
        let default = args(&[]);
        assert!(default.enabled("new") && default.enabled("shells"));
        assert!(!default.enabled("microvm"));
        let vm = args(&["microvm"]);
        assert!(vm.enabled("microvm") && !vm.enabled("new"));
        assert!(args(&["new", "microvm"]).enabled("microvm"));
    }

    #[test]
    fn date_format() {
        let d = utc_now();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.starts_with("20"), "{d}");
    }
}
