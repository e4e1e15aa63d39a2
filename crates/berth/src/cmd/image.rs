//! `berth image build`: the CLI over `berth_image::build`, drawing its progress.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use berth_image::{human_bytes, BuildRequest, Progress, Source};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::{ImageBuildArgs, ImageCmd};

pub async fn run(cmd: ImageCmd) -> anyhow::Result<()> {
    match cmd {
        // The build blocks for minutes (mkfs) and owns a thread of its own.
        ImageCmd::Build(args) => tokio::task::spawn_blocking(move || build(args))
            .await
            .context("the image build task failed")?,
    }
}

fn build(args: ImageBuildArgs) -> anyhow::Result<()> {
    let source = if args.from == "host" {
        Source::Host
    } else {
        let dir = std::fs::canonicalize(&args.from)
            .with_context(|| format!("--from {}: no such directory", args.from))?;
        Source::Dir(dir)
    };
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| berth_image::default_name(&source));
    let init = std::env::current_exe().context("cannot find the running berth binary")?;
    let mut req = BuildRequest::new(args.data_dir.clone(), name.clone(), source, init);
    req.excludes = args.exclude.clone();
    req.default_excludes = !args.no_default_excludes;
    req.strip_init = !args.no_strip;
    req.force = args.force;

    let started = Instant::now();
    let progress = Steps::new();
    let outcome = berth_image::build(&req, &progress);
    progress.finish();
    let outcome = outcome.with_context(|| format!("cannot build image {name}"))?;
    let secs = started.elapsed().as_secs_f64();
    let a = &outcome.image.manifest.artifacts;
    if outcome.cached {
        eprintln!(
            "berth: image {name} is up to date (cached: inputs unchanged), checked in {secs:.2}s"
        );
    } else {
        eprintln!(
            "berth: built image {name} in {secs:.1}s: vmlinux {}, initramfs {}, rootfs {}",
            human_bytes(a.vmlinux.size),
            human_bytes(a.initramfs.size),
            human_bytes(a.rootfs.size)
        );
    }
    println!("{}", outcome.image.dir.display());
    Ok(())
}

/// Steps on stderr: a spinner (a bar while mkfs writes) on a terminal, plain lines
/// otherwise, so logs of scripted builds stay readable.
struct Steps {
    bar: Option<ProgressBar>,
    state: Mutex<StepState>,
}

#[derive(Default)]
struct StepState {
    current: Option<(String, Instant)>,
    /// Last quarter reported in plain mode.
    quarter: u64,
}

impl Steps {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(spinner_style());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self {
            bar,
            state: Mutex::new(StepState::default()),
        }
    }

    fn close_step(&self, state: &mut StepState) {
        if let Some((what, since)) = state.current.take() {
            let line = format!(
                "berth: image: {what} ({:.1}s)",
                since.elapsed().as_secs_f64()
            );
            match &self.bar {
                Some(bar) => bar.println(line),
                None => eprintln!("{line}"),
            }
        }
    }

    fn finish(&self) {
        if let Ok(mut state) = self.state.lock() {
            self.close_step(&mut state);
        }
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {msg} {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {elapsed}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl Progress for Steps {
    fn step(&self, index: usize, total: usize, what: &str) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        self.close_step(&mut state);
        let label = format!("[{index}/{total}] {what}");
        match &self.bar {
            Some(bar) => {
                bar.set_style(spinner_style());
                bar.set_length(0);
                bar.set_position(0);
                bar.reset_elapsed();
                bar.set_message(label.clone());
            }
            None => eprintln!("berth: image: {label} ..."),
        }
        state.current = Some((label, Instant::now()));
        state.quarter = 0;
    }

    fn bytes(&self, done: u64, total: u64) {
        match &self.bar {
            Some(bar) => {
                if bar.length() != Some(total) {
                    bar.set_style(bar_style());
                    bar.set_length(total);
                }
                bar.set_position(done);
            }
            None => {
                let Ok(mut state) = self.state.lock() else {
                    return;
                };
                let quarter = (done * 4).checked_div(total).unwrap_or(4);
                if quarter > state.quarter && quarter < 4 {
                    state.quarter = quarter;
                    eprintln!(
                        "berth: image:   {}% ({} of {})",
                        quarter * 25,
                        human_bytes(done),
                        human_bytes(total)
                    );
                }
            }
        }
    }

    fn note(&self, text: &str) {
        let line = format!("berth: image: {text}");
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
}
