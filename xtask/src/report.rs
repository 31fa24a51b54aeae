//! Results: what each workload measured, the targets, the table, the JSON and the docs page.
//!
//! A workload produces an [`Outcome`] of [`Measure`]s; a measure may carry a [`Target`], which
//! is reported as pass or miss and never fails the run. [`Report`] adds the machine
//! ([`Machine::detect`]) and the command, prints the table, and renders `docs/benchmarks.md`.
//!
//! It does not measure anything.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::verify::Verdict;

/// `>=` or `<=` a value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    /// `>=` or `<=`.
    pub op: Cow<'static, str>,
    /// The bound.
    pub value: f64,
}

impl Target {
    /// At least `v`.
    pub fn at_least(v: f64) -> Option<Target> {
        Some(Target {
            op: Cow::Borrowed(">="),
            value: v,
        })
    }
    /// At most `v`.
    pub fn at_most(v: f64) -> Option<Target> {
        Some(Target {
            op: Cow::Borrowed("<="),
            value: v,
        })
    }
    fn check(&self, v: f64) -> bool {
        if self.op == ">=" {
            v >= self.value
        } else {
            v <= self.value
        }
    }
}

/// One number a workload measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measure {
    /// What it is.
    pub name: String,
    /// Its value.
    pub value: f64,
    /// Its unit.
    pub unit: Cow<'static, str>,
    /// The target, if any.
    pub target: Option<Target>,
    /// Whether the target is met (None without a target).
    pub pass: Option<bool>,
}

/// What one workload run found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// `W1`, `W2`, ...
    pub workload: String,
    /// The variant: `zstd-1`, `io_uring`, ...
    pub variant: String,
    /// `voltail` or a peer's name.
    pub collector: String,
    /// Ran and delivered every line exactly once.
    pub ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// The delivery check.
    pub verdict: Option<Verdict>,
    /// The numbers.
    pub measures: Vec<Measure>,
    /// Notes (sizes, settings).
    pub notes: Vec<String>,
}

impl Outcome {
    /// An empty, successful outcome.
    pub fn new(workload: &str, variant: &str, collector: &str) -> Outcome {
        Outcome {
            workload: workload.into(),
            variant: variant.into(),
            collector: collector.into(),
            ok: true,
            error: None,
            verdict: None,
            measures: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Adds a measure.
    pub fn measure(&mut self, name: &str, value: f64, unit: &'static str, target: Option<Target>) {
        let pass = target.as_ref().map(|t| t.check(value));
        self.measures.push(Measure {
            name: name.into(),
            value,
            unit: Cow::Borrowed(unit),
            target,
            pass,
        });
    }
}

/// The machine the numbers came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// `nproc`.
    pub nproc: usize,
    /// CPU model from /proc/cpuinfo.
    pub cpu: String,
    /// MemTotal, GiB.
    pub memory_gib: f64,
    /// `uname -r`.
    pub kernel: String,
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg has them.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Machine {
    /// Reads it from /proc.
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu,
            memory_gib: kib / 1024.0 / 1024.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        }
    }

    /// One line.
    pub fn describe(&self) -> String {
        format!(
            "{} CPUs ({}), {:.1} GiB memory, Linux {}",
            self.nproc, self.cpu, self.memory_gib, self.kernel
        )
    }
}

/// The heading of the hand-written part of docs/benchmarks.md, which `--write-docs` keeps.
pub const ANALYSIS: &str = "## Analysis";

/// Everything one bench run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Where.
    pub machine: Machine,
    /// How to reproduce.
    pub command: String,
    /// Small sizes.
    pub quick: bool,
    /// When (RFC 3339, UTC).
    pub date: String,
    /// voltail's version and commit.
    pub voltail: String,
    /// The slow-NAS stand-in's settings.
    pub slownas: String,
    /// Load averages when the bench started and ended (the machine may be shared).
    pub load: (String, String),
    /// The results.
    pub outcomes: Vec<Outcome>,
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl Report {
    /// The results as a markdown table (also what the terminal shows).
    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str("| workload | variant | collector | measure | value | target | |\n");
        s.push_str("|---|---|---|---|---:|---|---|\n");
        for o in &self.outcomes {
            if let Some(e) = &o.error {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | **FAILED** | | | {} |",
                    o.workload,
                    o.variant,
                    o.collector,
                    e.replace('|', "/").replace('\n', " ")
                );
            }
            for m in &o.measures {
                let target = m
                    .target
                    .as_ref()
                    .map(|t| format!("{} {}", t.op, fmt_value(t.value)))
                    .unwrap_or_default();
                let pass = match m.pass {
                    Some(true) => "pass",
                    Some(false) => "MISS",
                    None => "",
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} {} | {} | {} |",
                    o.workload,
                    o.variant,
                    o.collector,
                    m.name,
                    fmt_value(m.value),
                    m.unit,
                    target,
                    pass
                );
            }
            if let Some(v) = &o.verdict {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | lines exactly once | {} / {} | all | {} |",
                    o.workload,
                    o.variant,
                    o.collector,
                    v.delivered,
                    v.expected,
                    if v.ok() { "ok" } else { "**LOST/DUP**" }
                );
            }
        }
        s
    }

    /// `docs/benchmarks.md`; `previous` is the page it replaces, whose hand-written
    /// `## Analysis` section (to the end of the page) is kept.
    pub fn markdown(&self, previous: Option<&str>) -> String {
        let mut s = String::new();
        s.push_str("# Benchmarks\n\n");
        s.push_str(
            "Measured by `cargo xtask bench` (see `xtask/src/bench.rs` for what each workload does). \
             Targets are reported as pass/MISS and never fail the bench; lost or duplicated lines do.\n\n",
        );
        let _ = writeln!(s, "- Machine: {}", self.machine.describe());
        let _ = writeln!(s, "- Date: {}", self.date);
        let _ = writeln!(s, "- voltail: {}", self.voltail);
        let _ = writeln!(s, "- Slow-NAS stand-in (W4): {}", self.slownas);
        let _ = writeln!(
            s,
            "- Load average (1/5/15 min) at start: {}, at end: {} (anything above 0 on a 2-core \
             machine is other work competing with the collector: read the numbers with that in mind)",
            self.load.0, self.load.1
        );
        let _ = writeln!(s, "- Reproduce: `{}`", self.command);
        s.push('\n');
        s.push_str("## Workloads\n\n");
        s.push_str(
            "- **W1 bulk**: 64 files of 16 MiB of nginx access lines (180-250 bytes), read from the \
             beginning into the file sink, with zstd level 1 and without compression. MiB are input \
             log bytes; CPU is user+system time of the voltail process until it exits after draining; \
             peak RSS is its own high-water mark (`ru_maxrss`, or its `VmHWM` sampled until it \
             exits when `ru_maxrss` only repeats the bench's own, which Linux folds in at `execve`). \
             `zstd-1 alone` compresses the same bytes in 1 MiB chunks on one thread, in-process: \
             the limit of the compress stage. `http sink, zstd-1` ships \
             the same with the `http` sink (zstd-1 bodies, `concurrency` 4) to a receiver on loopback \
             inside the bench process (its CPU is not counted), which stores the bodies; every line is \
             then decoded and checked as for the file sink.\n\
             - **W2 idle**: 10,000 files in 2,000 pod directories; once caught up, CPU (% of one core) \
             over two 30 s windows from 2 s after catch-up: the first while the files back off to \
             `max_poll_interval` (reported, no target), the second idle (the target); RSS at the end.\n\
             - **W3 steady**: 1,000 files each appended 10 lines/s for 60 s by a writer pool; each line \
             carries its write time; latency is when the event appears in the sink's NDJSON output minus \
             that time, read by a follower polling the sink every 1 ms (poll interval 1 s). **W3 \
             probe**: the same with the eBPF probe on, every poll interval at 10 s and no batch linger \
             (`linger = \"0ms\"`), so the latency is the probe's (the writers are local); its CPU \
             target is W3's CPU without the probe. Beside it, the probe off with every poll at 10 ms: \
             what that latency costs by polling. **Probe cost**: one writer thread writing nginx lines \
             as fast as it can, one `write` per line or 64 KiB writes, in alternating phases (10 rounds \
             of 1.5 s each, and a last off phase) with the probe off, an empty program where the probe \
             attaches (the kernel's floor), and the probe on; the writer thread's CPU per line, the \
             cost the median of the rounds' on/off ratios, each round's off cost interpolated from \
             the off phases before and after it to the time of its other phases (the ratio of the \
             totals beside it). A single run's cost \
             moves by several points on a shared VM: compare the median of several runs.\n\
             - **W4 slow NAS**: W2 and W3 read through the FUSE stand-in (`cargo xtask slownas`), \
             io_uring and pread side by side; the writers append to the source directory (pods on \
             other nodes) while voltail reads the mount. The round is measured from the filesystem's \
             side: the time until every file has been stat'ed or read once, a quiet gap starting a new \
             round (with `max_poll_interval` = `poll_interval` so every file is polled every round); \
             voltail's own `voltail_poll_round_seconds` is shown beside it when a round finished \
             in the window.\n\n",
        );
        s.push_str("## Results\n\n");
        s.push_str(&self.table());
        s.push('\n');
        let notes: Vec<String> = self
            .outcomes
            .iter()
            .flat_map(|o| {
                o.notes
                    .iter()
                    .map(move |n| format!("- {} {} {}: {n}", o.workload, o.variant, o.collector))
            })
            .collect();
        if !notes.is_empty() {
            s.push_str("## Notes\n\n");
            s.push_str(&notes.join("\n"));
            s.push('\n');
        }
        if let Some(i) = previous.and_then(|p| p.find(ANALYSIS).map(|i| &p[i..])) {
            s.push('\n');
            s.push_str(i);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_targets_and_failures() {
        let mut o = Outcome::new("W1", "zstd-1", "voltail");
        o.measure("MiB per CPU-s", 250.0, "MiB/s", Target::at_least(200.0));
        o.measure("peak RSS", 80.0, "MiB", Target::at_most(64.0));
        let mut f = Outcome::new("W2", "idle", "voltail");
        f.ok = false;
        f.error = Some("3 missing".into());
        let r = Report {
            machine: Machine::detect(),
            command: "cargo xtask bench".into(),
            quick: true,
            date: "now".into(),
            voltail: "test".into(),
            slownas: "1ms".into(),
            load: (loadavg(), loadavg()),
            outcomes: vec![o, f],
        };
        let t = r.table();
        assert!(t.contains("| 250 MiB/s | >= 200 | pass |"), "{t}");
        assert!(t.contains("| 80.0 MiB | <= 64.0 | MISS |"), "{t}");
        assert!(t.contains("**FAILED**"), "{t}");
        assert!(r.markdown(None).contains("Reproduce: `cargo xtask bench`"));
        let again: Report =
            serde_json::from_str(&serde_json::to_string(&r).expect("to JSON")).expect("from JSON");
        assert_eq!(
            again.markdown(None),
            r.markdown(None),
            "a saved run renders the same"
        );
        let kept = r.markdown(Some("# old\n\n## Analysis\n\nW1 is slow because.\n"));
        assert!(
            kept.ends_with("## Analysis\n\nW1 is slow because.\n"),
            "{kept}"
        );
    }
}
