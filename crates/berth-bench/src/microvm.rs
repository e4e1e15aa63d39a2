//! The microVM benchmarks of issue 4 (`--only microvm`): guest image build (cold and
//! cached), new session → first output, boot (VMM spawn → the guest agent's first
//! `Health` answer) and host memory overhead per idle microVM. Every VM figure is
//! labelled with the accelerator the server really used (KVM or TCG), read from its log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use berth_api::{CommandRequest, RuntimeSpec};

use crate::benches::{
    argv, ms, new_session_runs, parse_debug_duration, strip_ansi, timed, NewRuns, NewTimes,
};
use crate::host::{self, Mapping};
use crate::report::{num, Figure, Target};
use crate::server::Server;
use crate::{Args, Ctx};

/// Issue 4: new session → first output under TCG, in ms.
const TCG_FIRST_OUTPUT_MS: f64 = 3000.0;
/// Issue 4: new session → first output under KVM, in ms.
const KVM_FIRST_OUTPUT_MS: f64 = 150.0;
/// Issue 4: host memory overhead per idle microVM under KVM, in MiB.
const KVM_OVERHEAD_MIB: f64 = 30.0;
/// The runtime the microVM sessions use.
const RUNTIME: &str = "bench-microvm";

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// The data dir whose `images/` the server boots from (`--guest-images`).
pub(crate) struct Images {
    dir: PathBuf,
    /// Removed on drop, when this run built the images itself.
    _tmp: Option<tempfile::TempDir>,
}

impl Images {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// One `berth image build` run.
struct Build {
    wall: Duration,
    cached: bool,
    /// `[i/n] step (x.ys)` progress lines.
    steps: Vec<String>,
    /// The build's last stderr line (`built image host in …` or `… is up to date …`).
    summary: String,
}

async fn build_image(berth: &Path, data_dir: &Path) -> Result<Build> {
    let t0 = Instant::now();
    let out = tokio::process::Command::new(berth)
        .args(["image", "build", "--from", "host", "--data-dir"])
        .arg(data_dir)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run {} image build", berth.display()))?;
    let wall = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "berth image build --from host --data-dir {} failed ({}): {}",
            data_dir.display(),
            out.status,
            stderr.trim()
        );
    }
    let steps = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("berth: image: "))
        .filter(|l| l.starts_with('[') && l.ends_with("s)"))
        .map(str::to_string)
        .collect();
    let summary = stderr.lines().last().unwrap_or_default().to_string();
    Ok(Build {
        wall,
        cached: summary.contains("up to date"),
        steps,
        summary,
    })
}

/// Build the `host` guest image into a fresh data dir twice (cold, then cached) and
/// time both; or take `--guest-images` as it is.
pub(crate) async fn images(
    args: &Args,
    figures: &mut Vec<Figure>,
    notes: &mut Vec<String>,
) -> Result<Images> {
    if let Some(dir) = &args.guest_images {
        notes.push(format!(
            "microvm: guest images taken from {} (--guest-images); no build figures",
            dir.display()
        ));
        return Ok(Images {
            dir: dir.clone(),
            _tmp: None,
        });
    }
    let berth = args
        .berth
        .canonicalize()
        .with_context(|| format!("cannot find the berth binary {}", args.berth.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix("berth-bench-images-")
        .tempdir_in(&args.tmp_dir)
        .with_context(|| format!("cannot create a temp dir in {}", args.tmp_dir.display()))?;
    let dir = tmp.path().join("data");
    eprintln!(
        "berth-bench: microvm: cold image build into {}",
        dir.display()
    );
    let cold = build_image(&berth, &dir).await?;
    if cold.cached {
        bail!(
            "the first image build into an empty data dir reported a cache hit: {}",
            cold.summary
        );
    }
    eprintln!("berth-bench: microvm: cached image build");
    let cached = build_image(&berth, &dir).await?;
    if !cached.cached {
        bail!(
            "the second image build with nothing changed was not a cache hit: {}",
            cached.summary
        );
    }
    let mut cold_note = format!(
        "`berth image build --from host --data-dir <empty temp dir>` (kernel .deb \
         downloaded too); {}",
        cold.summary.trim_start_matches("berth: ")
    );
    if !cold.steps.is_empty() {
        cold_note.push_str("; steps: ");
        cold_note.push_str(&cold.steps.join(", "));
    }
    figures.push(
        Figure::single(
            "microvm.image_build_cold_s",
            "microVM guest image build, cold (no VM involved)",
            "s",
            cold.wall.as_secs_f64(),
            "wall",
        )
        .note(cold_note),
    );
    figures.push(
        Figure::single(
            "microvm.image_build_cached_s",
            "microVM guest image build, cached (same command again)",
            "s",
            cached.wall.as_secs_f64(),
            "wall",
        )
        .note(cached.summary.trim_start_matches("berth: ").to_string()),
    );
    Ok(Images {
        dir,
        _tmp: Some(tmp),
    })
}

/// One `microvm ready` debug line of the server log (one VM start).
#[derive(Debug, Clone, PartialEq)]
struct VmReady {
    /// `kvm` or `tcg`.
    accel: String,
    /// The driver's whole `start()`: workspace image, cgroup, VMM spawn, boot.
    boot: Duration,
    /// VMM spawn (birth time of `vm/<id>/vmm.log`, created just before the spawn) →
    /// the guest agent's first `Health` answer.
    spawn_to_health: Option<Duration>,
}

/// `microvm ready` lines of the server log: session id → every VM start, in order.
fn vm_ready_lines(log: &str) -> BTreeMap<String, Vec<VmReady>> {
    let mut out: BTreeMap<String, Vec<VmReady>> = BTreeMap::new();
    for line in log.lines() {
        let line = strip_ansi(line);
        if !line.contains("microvm ready") {
            continue;
        }
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(|v| v.trim_matches('"').to_string())
        };
        let (Some(session), Some(accel), Some(boot)) = (
            field("session="),
            field("accel="),
            field("boot=").as_deref().and_then(parse_debug_duration),
        ) else {
            continue;
        };
        let spawn_to_health = field("spawn_to_health=").and_then(|v| {
            v.strip_prefix("Some(")
                .and_then(|v| v.strip_suffix(')'))
                .and_then(parse_debug_duration)
        });
        out.entry(session).or_default().push(VmReady {
            accel,
            boot,
            spawn_to_health,
        });
    }
    out
}

/// What the server's log says about the accelerator: `KVM` or `TCG` and why.
fn accel_from_log(log: &str) -> Option<(&'static str, String)> {
    for line in log.lines() {
        let line = strip_ansi(line);
        if let Some(at) = line.find("microVMs use TCG") {
            let why = line[at..].split_once("because ").map_or("", |(_, why)| why);
            let mut short: String = why.chars().take(160).collect();
            if short.len() < why.len() {
                short.push('…');
            }
            return Some(("TCG", short));
        }
        if line.contains("microVMs use KVM") {
            let boot = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("boot="))
                .unwrap_or("?");
            return Some(("KVM", format!("KVM probe booted the guest in {boot}")));
        }
    }
    None
}

/// Host memory of one idle microVM's VMM, from `/proc/<pid>/smaps`.
#[derive(Debug, Clone, Default, PartialEq)]
struct VmMemory {
    rss: u64,
    pss: u64,
    /// Rss (= Pss: private) of the anonymous mapping that is the guest's RAM.
    guest_rss: u64,
    guest_pss: u64,
    /// Resident anonymous memory outside the guest RAM: the VMM's own, private memory.
    other_anonymous: u64,
    /// Rss outside the guest RAM by kind (see [`kind`]).
    other_by_kind: BTreeMap<&'static str, u64>,
}

/// The boot files' names in an image dir: `initramfs.cpio` is what a berth from before
/// the lz4 initramfs wrote (`--berth` may be one).
const BOOT_FILES: &[&str] = &["/vmlinux", "/initramfs.cpio.lz4", "/initramfs.cpio"];

/// What a mapping of the VMM other than the guest RAM is, for the breakdown.
fn kind(m: &Mapping) -> &'static str {
    let file = !m.anon && !m.path.starts_with('[');
    if file && BOOT_FILES.iter().any(|f| m.path.ends_with(f)) {
        // QEMU keeps the boot files mapped (page cache, shared by every VM of the image).
        "boot files (vmlinux, initramfs)"
    } else if file {
        "QEMU binary and libraries"
    } else if m.perms.contains('x') {
        // The TCG translation cache; nothing under KVM.
        "anon exec (TCG code)"
    } else {
        "anon (heap, stacks, buffers)"
    }
}

impl VmMemory {
    /// The guest RAM is the anonymous read-write mapping whose size is the VM's memory.
    fn of(maps: &[Mapping], guest_bytes: u64) -> Result<Self> {
        let guest: Vec<usize> = maps
            .iter()
            .enumerate()
            .filter(|(_, m)| m.anon && m.size == guest_bytes && m.perms.starts_with("rw"))
            .map(|(i, _)| i)
            .collect();
        let [g] = guest[..] else {
            let mut big: Vec<&Mapping> = maps.iter().filter(|m| m.anon).collect();
            big.sort_by_key(|m| std::cmp::Reverse(m.size));
            big.truncate(5);
            let big: Vec<String> = big
                .iter()
                .map(|m| format!("{} {} MiB", m.perms, num(mib(m.size))))
                .collect();
            bail!(
                "{} anonymous read-write mappings of exactly {} MiB (the guest RAM) in the \
                 VMM; largest anonymous mappings: {big:?}",
                guest.len(),
                num(mib(guest_bytes))
            );
        };
        let mut out = Self {
            guest_rss: maps[g].rss,
            guest_pss: maps[g].pss,
            ..Self::default()
        };
        for (i, m) in maps.iter().enumerate() {
            out.rss += m.rss;
            out.pss += m.pss;
            if i == g {
                continue;
            }
            out.other_anonymous += m.anonymous;
            *out.other_by_kind.entry(kind(m)).or_default() += m.rss;
        }
        Ok(out)
    }
}

/// The VMM pid of a running microVM session: first field of `vm/<id>/vmm.pid`.
fn vmm_pid(data_dir: &Path, session: &str) -> Result<i32> {
    let path = data_dir.join("vm").join(session).join("vmm.pid");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    text.split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("{} holds no pid: {text:?}", path.display()))
}

/// A figure whose headline is the mean of `samples` (max in the summary).
fn mean_figure(key: &str, name: &str, unit: &'static str, samples: &[f64]) -> Figure {
    let mut f = Figure::from_samples(key, name, unit, samples);
    f.value = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    f.value_is = "mean";
    f
}

pub(crate) async fn run(
    ctx: &Ctx,
    server: &Server,
    figures: &mut Vec<Figure>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let spec: RuntimeSpec = serde_json::from_value(serde_json::json!({
        "name": RUNTIME,
        "isolation": "microvm",
        "memory": ctx.args.vm_memory,
    }))
    .context("cannot describe the microVM runtime")?;
    ctx.client
        .create_runtime(&spec)
        .await
        .context("cannot create the microVM runtime")?;

    // 1. New session → first output (the `new` benchmark's loop, on the microVM runtime).
    eprintln!(
        "berth-bench: microvm: new session ({} warm-up + {} runs)",
        ctx.args.warmup, ctx.args.vm_runs
    );
    let NewTimes { ids, started, exit } = new_session_runs(
        ctx,
        &NewRuns {
            tag: "vm-new",
            runtime: Some(RUNTIME),
            warmup: ctx.args.warmup,
            runs: ctx.args.vm_runs,
            gap: Duration::ZERO,
            keep: false,
            progress: true,
        },
    )
    .await?;

    // 2. Idle microVMs for the memory overhead.
    let n = ctx.args.vm_idle;
    eprintln!("berth-bench: microvm: memory ({n} idle VMs)");
    let idle: Vec<String> = (0..n)
        .map(|i| ctx.session(&format!("vm-idle-{i}")))
        .collect();
    let req = CommandRequest {
        runtime: Some(RUNTIME.into()),
        ..argv(&["true"])
    };
    for id in &idle {
        timed(ctx, id, &req).await?;
        ctx.observe_cgroup(id);
    }
    tokio::time::sleep(Duration::from_secs(ctx.args.vm_settle_s)).await;
    let mut mems = Vec::new();
    let mut cgroup_usage = Vec::new();
    for id in &idle {
        let pid = vmm_pid(&server.data_dir, id)?;
        let maps = host::smaps(pid)
            .ok_or_else(|| anyhow!("cannot read /proc/{pid}/smaps (VMM of session {id})"))?;
        mems.push(
            VmMemory::of(&maps, ctx.args.vm_memory)
                .with_context(|| format!("VMM {pid} of session {id}"))?,
        );
        if let Some(m) = host::sandbox_memory(id) {
            cgroup_usage.push(mib(m.usage));
        }
    }
    for id in &idle {
        ctx.delete(id).await?;
    }

    // 3. What the server log says: the accelerator and each VM's boot.
    let log = server.log_text();
    let ready = vm_ready_lines(&log);
    let mut boots = Vec::new();
    for id in &ids {
        let r = ready
            .get(id)
            .and_then(|v| v.first())
            .ok_or_else(|| anyhow!("no `microvm ready` line in the server log for {id}"))?;
        boots.push(r.clone());
    }
    let mut accels: Vec<String> = ids
        .iter()
        .chain(&idle)
        .flat_map(|id| ready.get(id).into_iter().flatten())
        .map(|r| r.accel.to_uppercase())
        .collect();
    accels.sort();
    accels.dedup();
    let accel: &'static str = match (&accels[..], accel_from_log(&log)) {
        ([one], Some((logged, why))) if one == logged => {
            notes.push(format!(
                "microvm: accelerator {logged}, from the server log: {}",
                if why.is_empty() { "-" } else { &why }
            ));
            logged
        }
        ([one], None) if ctx.args.microvm_accel.is_some() => {
            notes.push(format!(
                "microvm: accelerator {one}, fixed by --microvm-accel (no probe)"
            ));
            if one == "KVM" {
                "KVM"
            } else {
                "TCG"
            }
        }
        (seen, logged) => bail!(
            "cannot tell the accelerator: `microvm ready` lines say {seen:?}, the log's \
             probe result {logged:?}"
        ),
    };
    let tcg = accel == "TCG";

    // 4. Figures.
    let label = |what: &str| format!("microVM ({accel}): {what}");
    let first_output_targets = |f: Figure| {
        if tcg {
            f.target(Target::at_most(TCG_FIRST_OUTPUT_MS).under("TCG"))
                .also_target(
                    Target::at_most(KVM_FIRST_OUTPUT_MS)
                        .under("KVM")
                        .not_applicable("TCG"),
                )
        } else {
            f.target(Target::at_most(KVM_FIRST_OUTPUT_MS).under("KVM"))
        }
    };
    let overhead_target = || {
        let t = Target::at_most(KVM_OVERHEAD_MIB).under("KVM");
        if tcg {
            t.not_applicable("TCG")
        } else {
            t
        }
    };
    let memory_mib = num(mib(ctx.args.vm_memory));
    figures.push(
        first_output_targets(Figure::from_samples(
            "microvm.new_session.started_ms",
            &label("new session → first output (`started`) of `true`"),
            "ms",
            &started,
        ))
        .note(format!(
            "runtime `--isolation microvm --memory {memory_mib}M`; {} unmeasured warm-ups \
             first (the first also ran the server's KVM probe); each session deleted after \
             its run (untimed)",
            ctx.args.warmup
        )),
    );
    figures.push(Figure::from_samples(
        "microvm.new_session.exit_ms",
        &label("new session → `exit` of `true`"),
        "ms",
        &exit,
    ));
    let spawn: Vec<f64> = boots
        .iter()
        .filter_map(|b| b.spawn_to_health.map(ms))
        .collect();
    if spawn.len() == boots.len() {
        figures.push(
            Figure::from_samples(
                "microvm.boot_ms",
                &label("boot, VMM spawn → guest agent's first `Health` answer"),
                "ms",
                &spawn,
            )
            .note(
                "server log `microvm ready spawn_to_health=`: from the birth time of \
                 `vm/<id>/vmm.log` (created just before the spawn; file times are kernel-tick \
                 coarse, so this over-counts by under one tick) to the answer",
            ),
        );
    } else {
        notes.push(format!(
            "microvm: {} of {} `microvm ready` lines lack `spawn_to_health` (no file birth \
             times here?); boot figure left out",
            boots.len() - spawn.len(),
            boots.len()
        ));
    }
    let driver: Vec<f64> = boots.iter().map(|b| ms(b.boot)).collect();
    figures.push(Figure::from_samples(
        "microvm.driver_start_ms",
        &label("↳ driver `start()`: workspace image, cgroup, spawn, boot (`boot=`)"),
        "ms",
        &driver,
    ));
    let api: Vec<f64> = started.iter().zip(&driver).map(|(s, d)| s - d).collect();
    figures.push(Figure::from_samples(
        "microvm.new_session.outside_driver_ms",
        &label("↳ first output minus driver `start()` (API, core, exec)"),
        "ms",
        &api,
    ));

    let rss: Vec<f64> = mems.iter().map(|m| mib(m.rss - m.guest_rss)).collect();
    let pss: Vec<f64> = mems.iter().map(|m| mib(m.pss - m.guest_pss)).collect();
    let touched: Vec<f64> = mems.iter().map(|m| mib(m.guest_rss)).collect();
    let total: Vec<f64> = mems.iter().map(|m| mib(m.rss)).collect();
    let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
    for m in &mems {
        for (k, v) in &m.other_by_kind {
            *kinds.entry(k).or_default() += v;
        }
    }
    let kinds: Vec<String> = kinds
        .iter()
        .map(|(k, v)| format!("{k} {} MiB", num(mib(*v) / n as f64)))
        .collect();
    figures.push(
        mean_figure(
            "microvm.overhead_rss_mib",
            &label("host memory overhead per idle VM: VMM Rss minus guest RAM Rss"),
            "MiB",
            &rss,
        )
        .target(overhead_target())
        .note(format!(
            "{n} idle VMs, {} s after boot; `/proc/<vmm pid>/smaps`, guest RAM = the \
             anonymous rw mapping of exactly {memory_mib} MiB; max {} MiB; the rest by \
             kind (Rss, mean per VM): {}",
            ctx.args.vm_settle_s,
            num(max(&rss)),
            kinds.join(", ")
        )),
    );
    figures.push(
        mean_figure(
            "microvm.overhead_pss_mib",
            &label("host memory overhead per idle VM: VMM Pss minus guest RAM Pss"),
            "MiB",
            &pss,
        )
        .target(overhead_target())
        .note(format!(
            "Pss divides the pages the {n} VMs share (QEMU's binary and libraries, the boot \
             files) among them; max {} MiB",
            num(max(&pss))
        )),
    );
    let anon: Vec<f64> = mems.iter().map(|m| mib(m.other_anonymous)).collect();
    figures.push(
        mean_figure(
            "microvm.overhead_anon_mib",
            &label("↳ of the overhead: the VMM's private anonymous memory"),
            "MiB",
            &anon,
        )
        .note(format!(
            "`Anonymous:` outside the guest RAM (no page cache, nothing shared); max {} MiB",
            num(max(&anon))
        )),
    );
    figures.push(
        mean_figure(
            "microvm.guest_ram_touched_mib",
            &label(&format!(
                "↳ guest RAM touched (Rss of the {memory_mib} MiB mapping)"
            )),
            "MiB",
            &touched,
        )
        .note(format!("max {} MiB", num(max(&touched)))),
    );
    figures.push(mean_figure(
        "microvm.vmm_rss_mib",
        &label("↳ VMM process Rss, total"),
        "MiB",
        &total,
    ));
    if cgroup_usage.len() == n {
        figures.push(
            mean_figure(
                "microvm.cgroup_usage_mib",
                &label("↳ VMM cgroup memory usage (includes page cache of its disk I/O)"),
                "MiB",
                &cgroup_usage,
            )
            .note("memory.usage_in_bytes (v1) / memory.current (v2)"),
        );
    }
    ctx.client
        .delete_runtime(RUNTIME)
        .await
        .context("cannot delete the microVM runtime")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines() {
        let log = "2026-11-21T18:00:00.1Z \u{1b}[34mDEBUG\u{1b}[0m berth_sandbox::microvm: microvm ready session=b1-vm-new-0 accel=\"tcg\" boot=3.51s spawn_to_health=Some(3.2s)\n\
                   2026-11-21T18:00:05.1Z DEBUG berth_sandbox::microvm: microvm ready session=b1-vm-new-0 accel=kvm boot=90ms spawn_to_health=None\n\
                   other line\n";
        let m = vm_ready_lines(log);
        assert_eq!(
            m["b1-vm-new-0"],
            vec![
                VmReady {
                    accel: "tcg".into(),
                    boot: Duration::from_millis(3510),
                    spawn_to_health: Some(Duration::from_millis(3200)),
                },
                VmReady {
                    accel: "kvm".into(),
                    boot: Duration::from_millis(90),
                    spawn_to_health: None,
                }
            ]
        );
    }

    #[test]
    fn accel_lines() {
        let tcg = "x \u{1b}[33m WARN\u{1b}[0m berth_sandbox::microvm: microVMs use TCG (software \
                   emulation, slow: for development and tests only) because KVM cannot boot \
                   the guest here: the VM exited during boot\n";
        let (accel, why) = accel_from_log(tcg).unwrap();
        assert_eq!(accel, "TCG");
        assert!(why.starts_with("KVM cannot boot"), "{why}");
        let kvm = "x INFO berth_sandbox::microvm: microVMs use KVM boot=95ms\n";
        assert_eq!(accel_from_log(kvm).unwrap().0, "KVM");
        assert!(accel_from_log("nothing\n").is_none());
    }

    fn map(perms: &str, path: &str, anon: bool, size_mib: u64, rss_mib: u64) -> Mapping {
        Mapping {
            perms: perms.into(),
            path: path.into(),
            anon,
            size: size_mib << 20,
            rss: rss_mib << 20,
            pss: rss_mib << 20,
            anonymous: if anon || path == "[heap]" {
                rss_mib << 20
            } else {
                0
            },
        }
    }

    #[test]
    fn guest_ram_is_the_mapping_of_its_size() {
        let maps = vec![
            map("r-xp", "/usr/bin/qemu-system-x86_64", false, 20, 8),
            map("r--p", "/d/images/host/initramfs.cpio.lz4", false, 32, 32),
            map("r--p", "/d/images/old/initramfs.cpio", false, 4, 4),
            map("rw-p", "", true, 512, 100),
            map("rwxp", "", true, 1024, 30),
            map("rw-p", "[heap]", false, 40, 6),
            map("rw-p", "", true, 8, 2),
        ];
        let m = VmMemory::of(&maps, 512 << 20).unwrap();
        assert_eq!(m.rss, 182 << 20);
        assert_eq!(m.guest_rss, 100 << 20);
        assert_eq!(m.other_anonymous, 38 << 20);
        let by = |k: &str| m.other_by_kind[k] >> 20;
        assert_eq!(by("QEMU binary and libraries"), 8);
        assert_eq!(by("boot files (vmlinux, initramfs)"), 36);
        assert_eq!(by("anon exec (TCG code)"), 30);
        assert_eq!(by("anon (heap, stacks, buffers)"), 8);
        assert!(VmMemory::of(&maps, 256 << 20).is_err());
    }
}
