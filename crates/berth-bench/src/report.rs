//! The figures, as a markdown table and as JSON.

use std::fmt::Write as _;

use serde::Serialize;

use crate::host::Machine;
use crate::stats::Summary;

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cmp {
    AtMost,
    AtLeast,
}

/// A target from the issues, compared against a figure's headline value.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub cmp: Cmp,
    pub value: f64,
    /// Where the target is set, e.g. `KVM` (microVM targets differ by accelerator);
    /// `None` = everywhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Why this run is not held to the target (e.g. `TCG` for a KVM target): the
    /// value is still compared with it, but the figure's `met` stays empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_applicable: Option<String>,
}

impl Target {
    pub fn at_most(value: f64) -> Self {
        Self {
            cmp: Cmp::AtMost,
            value,
            scope: None,
            not_applicable: None,
        }
    }
    pub fn at_least(value: f64) -> Self {
        Self {
            cmp: Cmp::AtLeast,
            value,
            scope: None,
            not_applicable: None,
        }
    }
    /// A target set for `scope` only (e.g. `KVM`).
    pub fn under(mut self, scope: &str) -> Self {
        self.scope = Some(scope.into());
        self
    }
    /// This run is not held to the target, because of `why` (e.g. `TCG`).
    pub fn not_applicable(mut self, why: &str) -> Self {
        self.not_applicable = Some(why.into());
        self
    }
    pub fn met(&self, v: f64) -> bool {
        match self.cmp {
            Cmp::AtMost => v <= self.value,
            Cmp::AtLeast => v >= self.value,
        }
    }
    fn text(&self, unit: &str) -> String {
        let op = match self.cmp {
            Cmp::AtMost => "≤",
            Cmp::AtLeast => "≥",
        };
        match &self.scope {
            Some(scope) => format!("{op} {} {unit} ({scope})", num(self.value)),
            None => format!("{op} {} {unit}", num(self.value)),
        }
    }
}

/// A further target of a figure (e.g. the KVM target beside the TCG one) and how the
/// value compares with it.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub target: Target,
    /// `None` when the target does not apply to this run.
    pub met: Option<bool>,
    /// The comparison itself, whether or not the target applies.
    pub within: bool,
}

impl TargetCheck {
    fn of(target: Target, value: f64) -> Self {
        let within = target.met(value);
        Self {
            met: target.not_applicable.is_none().then_some(within),
            within,
            target,
        }
    }

    fn met_text(&self) -> String {
        match (&self.target.not_applicable, self.met) {
            (Some(why), _) => format!(
                "n/a ({why}); would be {}",
                if self.within { "yes" } else { "**no**" }
            ),
            (None, Some(true)) => "yes".into(),
            (None, _) => "**no**".into(),
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable key for the JSON output, e.g. `new_session.started_ms`.
    pub key: String,
    pub name: String,
    pub unit: &'static str,
    /// Percentiles over the runs; absent for single-valued figures.
    pub summary: Option<Summary>,
    pub runs: usize,
    /// The value compared with the target.
    pub value: f64,
    /// Which statistic `value` is: `p50`, `mean`, `count`, `total`.
    pub value_is: &'static str,
    pub target: Option<Target>,
    /// Whether `value` meets `target`; `None` without a target or when the target does
    /// not apply to this run (see `Target::not_applicable`).
    pub met: Option<bool>,
    /// Targets beyond `target`, each with its comparison.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub more_targets: Vec<TargetCheck>,
    pub note: String,
}

impl Figure {
    /// A figure whose headline is the median of `samples`.
    pub fn from_samples(key: &str, name: &str, unit: &'static str, samples: &[f64]) -> Self {
        let summary = Summary::of(samples);
        Self {
            key: key.into(),
            name: name.into(),
            unit,
            runs: samples.len(),
            value: summary.map_or(f64::NAN, |s| s.p50),
            summary,
            value_is: "p50",
            target: None,
            met: None,
            more_targets: Vec::new(),
            note: String::new(),
        }
    }

    pub fn single(
        key: &str,
        name: &str,
        unit: &'static str,
        value: f64,
        value_is: &'static str,
    ) -> Self {
        Self {
            key: key.into(),
            name: name.into(),
            unit,
            summary: None,
            runs: 1,
            value,
            value_is,
            target: None,
            met: None,
            more_targets: Vec::new(),
            note: String::new(),
        }
    }

    pub fn target(mut self, t: Target) -> Self {
        self.met = t.not_applicable.is_none().then(|| t.met(self.value));
        self.target = Some(t);
        self
    }

    /// One more target, shown after the first in the same row.
    pub fn also_target(mut self, t: Target) -> Self {
        self.more_targets.push(TargetCheck::of(t, self.value));
        self
    }

    pub fn runs(mut self, runs: usize) -> Self {
        self.runs = runs;
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }

    /// Put `prefix` before the note (joined with `; `).
    pub fn note_prefix(mut self, prefix: &str) -> Self {
        self.note = if self.note.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}; {}", self.note)
        };
        self
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date_utc: String,
    pub machine: Machine,
    pub berth_version: String,
    pub driver: String,
    pub command_line: Vec<String>,
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
}

/// A number with as many decimals as its size deserves.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let a = v.abs();
    if a >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl Report {
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "berth {} ({} driver) · {} · {} CPUs ({}) · {:.1} GiB RAM · Linux {} · cgroup {}\n",
            self.berth_version,
            self.driver,
            self.date_utc,
            m.nproc,
            m.cpu_model,
            m.mem_total_gib,
            m.kernel,
            m.cgroup
        );
        out.push_str("| Benchmark | Runs | p50 | p95 | p99 | Value | Target | Met |\n");
        out.push_str("|---|---:|---:|---:|---:|---:|---|---|\n");
        for f in &self.figures {
            let (p50, p95, p99) = match &f.summary {
                Some(s) => (num(s.p50), num(s.p95), num(s.p99)),
                None => ("".into(), "".into(), "".into()),
            };
            let checks: Vec<TargetCheck> = f
                .target
                .iter()
                .map(|t| TargetCheck::of(t.clone(), f.value))
                .chain(f.more_targets.iter().cloned())
                .collect();
            let target: Vec<String> = checks.iter().map(|c| c.target.text(f.unit)).collect();
            let target = target.join("; ");
            let met: Vec<String> = checks.iter().map(TargetCheck::met_text).collect();
            let met = met.join("; ");
            let _ = writeln!(
                out,
                "| {} | {} | {p50} | {p95} | {p99} | {} {} ({}) | {target} | {met} |",
                f.name,
                f.runs,
                num(f.value),
                f.unit,
                f.value_is
            );
        }
        let notes: Vec<String> = self
            .figures
            .iter()
            .filter(|f| !f.note.is_empty())
            .map(|f| format!("- {}: {}", f.name, f.note))
            .chain(self.notes.iter().map(|n| format!("- {n}")))
            .collect();
        if !notes.is_empty() {
            out.push_str("\nNotes:\n");
            out.push_str(&notes.join("\n"));
            out.push('\n');
        }
        out
    }
}
