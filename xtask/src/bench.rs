//! `cargo xtask bench`: the workloads W1-W4, run against voltail and optional peers.
//!
//! [`run`] finds (or builds) the release binary, then runs each selected workload in a fresh
//! directory under the temp dir: it generates the tree ([`Tree`]), starts the collector
//! ([`Collector::start`]), measures, stops it with SIGTERM, and checks the output with a
//! [`Checker`]. Every workload fails loudly when a line was lost or duplicated or the collector
//! crashed; numbers that miss their targets are only reported. Results go to the terminal,
//! to `<target dir>/bench/results.json`, and with `--write-docs` to `docs/benchmarks.md`.
//!
//! A peer (`--peer NAME=CMD`) is any command that tails `{dir}` (the tree's root) into the
//! file `{out}`; its output lines only need to contain our lines, in any framing. Peers run on
//! W1 (uncompressed), W2 and W3.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::report::{Machine, Outcome, Report, Target};
use crate::runner::{free_port, scrape, Exit, Proc, VoltailConfig};
use crate::slownas::{rounds, SlowNas};
use crate::verify::{Checker, Follower};
use crate::workload::{now_ms, source_patterns, Tree};

const MIB: f64 = 1024.0 * 1024.0;

/// `cargo xtask bench` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Small workloads (seconds) for CI: fails only on lost/duplicated lines or crashes.
    #[arg(long)]
    quick: bool,
    /// Run only these workloads (comma-separated: W1,W2,W3,W4).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Also run another collector: NAME=CMD, CMD with {dir} (tree root) and {out} (output file).
    #[arg(long)]
    peer: Vec<String>,
    /// Worker threads of the slow-NAS stand-in (W4).
    #[arg(long, default_value_t = 64)]
    fuse_threads: usize,
    /// Latency the slow-NAS stand-in adds per operation (W4).
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// voltail binary (default: build and use target/release/voltail).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// poll_interval given to voltail.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Rewrite docs/benchmarks.md with the results.
    #[arg(long)]
    write_docs: bool,
    /// Run nothing: rewrite docs/benchmarks.md from a saved run's `results.json` (what a run
    /// writes under `target/bench/`), keeping the page's hand-written part.
    #[arg(long, value_name = "RESULTS_JSON", conflicts_with_all = ["quick", "only", "peer", "write_docs"])]
    render_docs: Option<PathBuf>,
    /// Where workloads are generated (default: the system temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the generated trees and outputs (prints where).
    #[arg(long)]
    keep: bool,
}

/// Workload sizes.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    w1_files: usize,
    w1_bytes: u64,
    w2_dirs: usize,
    w2_file_bytes: u64,
    w2_window: Duration,
    w3_files: usize,
    w3_rate: f64,
    w3_time: Duration,
    w4_dirs: usize,
    w4_w3_files: usize,
    w4_w3_time: Duration,
    w4_round_window: Duration,
    /// Upper bound on any wait for delivery; past it lines count as lost.
    patience: Duration,
}

impl Sizes {
    fn full() -> Sizes {
        Sizes {
            w1_files: 64,
            w1_bytes: 16 << 20,
            w2_dirs: 2000,
            w2_file_bytes: 2000,
            w2_window: Duration::from_secs(30),
            w3_files: 1000,
            w3_rate: 10.0,
            w3_time: Duration::from_secs(60),
            w4_dirs: 2000,
            w4_w3_files: 1000,
            w4_w3_time: Duration::from_secs(60),
            w4_round_window: Duration::from_secs(10),
            patience: Duration::from_secs(300),
        }
    }
    fn quick() -> Sizes {
        Sizes {
            w1_files: 4,
            w1_bytes: 4 << 20,
            w2_dirs: 100,
            w2_file_bytes: 2000,
            w2_window: Duration::from_secs(3),
            w3_files: 50,
            w3_rate: 10.0,
            w3_time: Duration::from_secs(5),
            w4_dirs: 40,
            w4_w3_files: 20,
            w4_w3_time: Duration::from_secs(4),
            w4_round_window: Duration::from_secs(3),
            patience: Duration::from_secs(90),
        }
    }
}

/// Who is benchmarked.
#[derive(Debug, Clone)]
enum Collector {
    Voltail { bin: PathBuf },
    Peer { name: String, cmd: String },
}

impl Collector {
    fn name(&self) -> &str {
        match self {
            Collector::Voltail { .. } => "voltail",
            Collector::Peer { name, .. } => name,
        }
    }
}

/// Per-run settings for voltail (ignored by peers).
#[derive(Debug, Clone)]
struct RunOpts {
    reader: &'static str,
    compression: &'static str,
    max_poll_interval: Option<Duration>,
    /// Ship with the `http` sink to this URL (W1's http variant) instead of the file sink.
    http_url: Option<String>,
    /// `poll_interval` instead of `--poll-interval`.
    poll_interval: Option<Duration>,
    /// The probe on, with this `probe_poll_interval` (W3's probe variant).
    probe_poll_interval: Option<Duration>,
    /// `[batch] linger` instead of the default (100 ms).
    linger: Option<Duration>,
}

impl Default for RunOpts {
    fn default() -> Self {
        RunOpts {
            reader: "auto",
            compression: "none",
            max_poll_interval: None,
            http_url: None,
            poll_interval: None,
            probe_poll_interval: None,
            linger: None,
        }
    }
}

/// A collector running on a tree.
struct Running {
    proc: Proc,
    who: Collector,
    /// voltail's metrics port.
    port: u16,
    /// voltail's sink dir, or the peer's output file.
    out: PathBuf,
    /// Peers: lines seen so far in their output.
    peer_follow: Option<(Follower, u64)>,
}

impl Collector {
    fn start(&self, root: &Path, dir: &Path, poll: Duration, o: &RunOpts) -> Result<Running> {
        std::fs::create_dir_all(dir)?;
        match self {
            Collector::Voltail { bin } => {
                let (include, path_tags) = source_patterns(root);
                let port = free_port()?;
                let out = dir.join("out");
                let cfg = VoltailConfig {
                    data_dir: dir.join("data"),
                    reader: o.reader.into(),
                    include,
                    path_tags,
                    poll_interval: o.poll_interval.unwrap_or(poll),
                    max_poll_interval: o.max_poll_interval,
                    compression: o.compression.into(),
                    out: out.clone(),
                    metrics_port: port,
                    http_url: o.http_url.clone(),
                    probe_poll_interval: o.probe_poll_interval,
                    linger: o.linger,
                };
                let path = dir.join("voltail.toml");
                std::fs::write(&path, cfg.render())?;
                let check = Command::new(bin)
                    .arg("check")
                    .arg("--config")
                    .arg(&path)
                    .output()
                    .with_context(|| format!("run {} check", bin.display()))?;
                if !check.status.success() {
                    bail!(
                        "voltail check rejected {}: {}{}",
                        path.display(),
                        String::from_utf8_lossy(&check.stdout),
                        String::from_utf8_lossy(&check.stderr)
                    );
                }
                let mut cmd = Command::new(bin);
                cmd.arg("run").arg("--config").arg(&path);
                cmd.env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or("info".into()),
                );
                let proc = Proc::spawn("voltail", cmd, &dir.join("voltail.log"))?;
                Ok(Running {
                    proc,
                    who: self.clone(),
                    port,
                    out,
                    peer_follow: None,
                })
            }
            Collector::Peer { name, cmd } => {
                let out = dir.join("out.log");
                let text = cmd
                    .replace("{dir}", &root.display().to_string())
                    .replace("{out}", &out.display().to_string());
                let mut c = Command::new("sh");
                c.arg("-c").arg(&text);
                let proc = Proc::spawn(name, c, &dir.join("peer.log"))?;
                Ok(Running {
                    proc,
                    who: self.clone(),
                    port: 0,
                    out: out.clone(),
                    peer_follow: Some((Follower::new(&out, false), 0)),
                })
            }
        }
    }
}

impl Running {
    fn is_voltail(&self) -> bool {
        matches!(self.who, Collector::Voltail { .. })
    }

    /// Lines read so far (voltail: its metric; peers: lines in their output).
    fn progress(&mut self) -> Option<u64> {
        match &mut self.peer_follow {
            None => scrape(self.port)
                .ok()
                .and_then(|m| m.get("voltail_read_lines_total").copied())
                .map(|v| v as u64),
            Some((f, n)) => {
                let mut add = 0;
                f.poll(|l| {
                    if crate::nginx::parse_line(l).is_some() {
                        add += 1;
                    }
                })
                .ok()?;
                *n += add;
                Some(*n)
            }
        }
    }

    /// Fails with the log when the collector exited on its own (a peer may, once done).
    fn check_alive(&mut self) -> Result<()> {
        if let Some(e) = self.proc.exited() {
            if self.is_voltail() || !e.status.success() {
                bail!(
                    "{} exited early ({}); log {}:\n{}",
                    self.who.name(),
                    e.status,
                    self.proc.log().display(),
                    self.proc.log_tail()
                );
            }
        }
        Ok(())
    }

    /// Waits until `expected` lines were read; returns the time since spawn.
    fn wait_lines(&mut self, expected: u64, patience: Duration) -> Result<Duration> {
        let deadline = Instant::now() + patience;
        let mut last = None;
        loop {
            if let Some(n) = self.progress() {
                last = Some(n);
                if n >= expected {
                    return Ok(self.proc.started.elapsed());
                }
            }
            if self.proc.exited().is_some() && !self.is_voltail() {
                // A peer that finished on its own: whatever it wrote is all there is.
                self.progress();
                return Ok(self.proc.started.elapsed());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{} read {last:?} of {expected} lines in {patience:?}; log {}:\n{}",
                    self.who.name(),
                    self.proc.log().display(),
                    self.proc.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, drain, exit; fails when it did not exit cleanly.
    fn stop(&mut self) -> Result<Exit> {
        let peer = !self.is_voltail();
        let e = self.proc.stop(peer, Duration::from_secs(60))?;
        if !peer && !e.status.success() {
            bail!(
                "voltail exited with {} after SIGTERM; log {}:\n{}",
                e.status,
                self.proc.log().display(),
                self.proc.log_tail()
            );
        }
        Ok(e)
    }

    /// Checks the output against the tree.
    fn verify(&self, tree: &Tree) -> Result<crate::verify::Verdict> {
        let mut c = Checker::new(tree);
        if self.is_voltail() {
            c.voltail_dir(&self.out)?;
        } else if self.out.exists() {
            c.raw_path(&self.out)?;
        }
        Ok(c.finish())
    }

    fn follower(&self) -> Follower {
        Follower::new(&self.out, self.is_voltail())
    }
}

/// Mean poll round between two scrapes of voltail's `voltail_poll_round_seconds`, seconds.
fn daemon_round(
    before: &std::collections::HashMap<String, f64>,
    after: &std::collections::HashMap<String, f64>,
) -> Option<f64> {
    let d = |k: &str| Some(after.get(k)? - before.get(k).copied().unwrap_or(0.0));
    let (sum, count) = (
        d("voltail_poll_round_seconds_sum")?,
        d("voltail_poll_round_seconds_count")?,
    );
    (count > 0.0).then(|| sum / count)
}

/// Notes which read backend voltail reports it runs (`voltail_reader_backend{backend=..}`).
fn backend_note(o: &mut Outcome, r: &Running) {
    if !r.is_voltail() {
        return;
    }
    let m = scrape(r.port).unwrap_or_default();
    let used: Vec<String> = m
        .iter()
        .filter(|(k, v)| k.starts_with("voltail_reader_backend{") && **v > 0.0)
        .filter_map(|(k, _)| k.split('"').nth(1).map(str::to_string))
        .collect();
    if !used.is_empty() {
        o.notes
            .push(format!("read backend in use: {}", used.join(", ")));
    }
}

/// Puts the verdict in the outcome; an error when lines were lost or duplicated.
fn judge(o: &mut Outcome, v: crate::verify::Verdict) -> Result<()> {
    let ok = v.ok();
    let msg = v.describe();
    o.verdict = Some(v);
    if !ok {
        bail!("delivery check failed: {msg}");
    }
    Ok(())
}

struct Ctx {
    args: BenchArgs,
    sizes: Sizes,
    work: PathBuf,
    collectors: Vec<Collector>,
}

impl Ctx {
    fn fresh(&self, name: &str) -> Result<PathBuf> {
        let d = self.work.join(name);
        if d.exists() {
            std::fs::remove_dir_all(&d)?;
        }
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }
    fn cleanup(&self, d: &Path) {
        if !self.args.keep {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Runs `f`, turning an error into a failed outcome.
fn attempt(
    outcomes: &mut Vec<Outcome>,
    mut o: Outcome,
    f: impl FnOnce(&mut Outcome) -> Result<()>,
) {
    let label = format!("{} {} {}", o.workload, o.variant, o.collector);
    eprintln!("bench: {label} ...");
    if let Err(e) = f(&mut o) {
        eprintln!("bench: {label} FAILED: {e:#}");
        o.ok = false;
        o.error = Some(format!("{e:#}"));
    }
    for m in &o.measures {
        eprintln!("bench:   {} = {:.3} {}", m.name, m.value, m.unit);
    }
    outcomes.push(o);
}

/// zstd level 1 alone on the tree's bytes, 1 MiB chunks, one thread: MiB per CPU-second.
fn zstd_alone(tree: &Tree) -> Result<f64> {
    let mut z = zstd::bulk::Compressor::new(1)?;
    let mut cpu = Duration::ZERO;
    let mut bytes = 0u64;
    let mut out = Vec::with_capacity(2 << 20);
    for i in 0..tree.rel.len() {
        let data = std::fs::read(tree.path(i))?;
        let t0 = thread_cpu();
        for chunk in data.chunks(1 << 20) {
            out.clear();
            out.reserve(zstd::zstd_safe::compress_bound(chunk.len()));
            z.compress_to_buffer(chunk, &mut out)?;
            bytes += chunk.len() as u64;
        }
        cpu += thread_cpu().saturating_sub(t0);
    }
    Ok(bytes as f64 / MIB / cpu.as_secs_f64().max(1e-9))
}

/// zstd level 1 alone on the NDJSON voltail wrote to `out` (1 MiB chunks, one thread): input
/// MiB per CPU-second, i.e. `input_mib` over the time it took to compress that output.
fn zstd_on_output(out: &Path, input_mib: f64) -> Result<(f64, f64)> {
    use std::io::Read as _;
    let mut z = zstd::bulk::Compressor::new(1)?;
    let mut cpu = Duration::ZERO;
    let mut bytes = 0u64;
    let mut buf = Vec::with_capacity(2 << 20);
    let mut chunk = Vec::with_capacity(1 << 20);
    for seg in crate::verify::segments(out)? {
        // 1 MiB at a time, not the whole segment: the bench's own memory stays small (a
        // 128 MiB segment read whole was the bench's high-water mark).
        let mut f = std::fs::File::open(&seg)?;
        loop {
            chunk.clear();
            (&mut f).take(1 << 20).read_to_end(&mut chunk)?;
            if chunk.is_empty() {
                break;
            }
            let t0 = thread_cpu();
            buf.clear();
            buf.reserve(zstd::zstd_safe::compress_bound(chunk.len()));
            z.compress_to_buffer(&chunk[..], &mut buf)?;
            cpu += thread_cpu().saturating_sub(t0);
            bytes += chunk.len() as u64;
        }
    }
    Ok((
        input_mib / cpu.as_secs_f64().max(1e-9),
        bytes as f64 / MIB / input_mib.max(1e-9),
    ))
}

fn thread_cpu() -> Duration {
    // SAFETY: a zeroed timespec is valid; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is valid for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn w1(ctx: &Ctx, outcomes: &mut Vec<Outcome>) -> Result<()> {
    let s = ctx.sizes;
    let base = ctx.fresh("w1")?;
    let root = base.join("root");
    let t0 = Instant::now();
    let tree = Tree::create(&root, s.w1_files, 1, s.w1_bytes, 1)?;
    eprintln!(
        "bench: W1 tree: {} files, {:.0} MiB, {} lines in {:.1?}",
        tree.rel.len(),
        tree.total_bytes() as f64 / MIB,
        tree.total_lines(),
        t0.elapsed()
    );
    let mib = tree.total_bytes() as f64 / MIB;
    let zstd_speed = zstd_alone(&tree)?;
    let mut o = Outcome::new("W1", "zstd-1 alone", "zstd crate");
    o.measure("MiB per CPU-s", zstd_speed, "MiB/s", None);
    outcomes.push(o);
    let mut ndjson = None;
    for c in &ctx.collectors {
        // (sink, compression): voltail also ships zstd-1 with the http sink to a receiver on
        // loopback (in this process, so its CPU is not counted), next to the file sink.
        let variants: &[(&'static str, &'static str)] = match c {
            Collector::Voltail { .. } => &[("file", "zstd"), ("file", "none"), ("http", "zstd")],
            Collector::Peer { .. } => &[("file", "none")],
        };
        for &(sink, comp) in variants {
            let comp = &comp;
            let variant = match (sink, *comp) {
                ("http", _) => "http sink, zstd-1",
                (_, "zstd") => "zstd-1",
                _ => "none",
            };
            let o = Outcome::new("W1", variant, c.name());
            attempt(outcomes, o, |o| {
                let dir = base.join(format!("{}-{sink}-{comp}", c.name()));
                let receiver = match sink {
                    "http" => Some(crate::receiver::Receiver::start(&dir.join("out"))?),
                    _ => None,
                };
                let opts = RunOpts {
                    compression: comp,
                    http_url: receiver.as_ref().map(|r| r.url()),
                    ..Default::default()
                };
                let mut r = c.start(&root, &dir, ctx.args.poll_interval, &opts)?;
                let read = r.wait_lines(tree.total_lines(), s.patience)?;
                let e = r.stop()?;
                o.notes.push(format!(
                    "all lines read after {read:.2?}, exited after {:.2?}",
                    e.wall
                ));
                if let Some(rc) = &receiver {
                    o.notes.push(format!(
                        "receiver on loopback: {} requests, {:.0} MiB of zstd bodies (concurrency 4)",
                        rc.requests.load(Ordering::Relaxed),
                        rc.bytes.load(Ordering::Relaxed) as f64 / MIB
                    ));
                }
                let cpu = e.cpu.as_secs_f64().max(1e-9);
                let per_cpu = mib / cpu;
                o.measure("MiB per wall-s", mib / e.wall.as_secs_f64(), "MiB/s", None);
                let target = match (sink, *comp, r.is_voltail()) {
                    ("file", "zstd", true) => Target::at_least(200.0),
                    ("file", _, true) => Target::at_least(600.0),
                    _ => None,
                };
                o.measure("MiB per CPU-s", per_cpu, "MiB/s", target);
                if *comp == "zstd" && sink == "file" {
                    o.measure(
                        "vs zstd-1 alone (per CPU-s)",
                        100.0 * per_cpu / zstd_speed,
                        "%",
                        Target::at_least(60.0),
                    );
                }
                o.measure("peak RSS", e.max_rss_kib as f64 / 1024.0, "MiB", None);
                o.notes.push(format!(
                    "{} files, {mib:.0} MiB, {} lines; wall {:.2?}, CPU {:.2?}",
                    tree.rel.len(),
                    tree.total_lines(),
                    e.wall,
                    e.cpu
                ));
                let v = r.verify(&tree)?;
                if *comp == "none" && r.is_voltail() && sink == "file" {
                    let (speed, growth) = zstd_on_output(&r.out, mib)?;
                    ndjson = Some((speed, growth));
                }
                ctx.cleanup(&dir);
                judge(o, v)
            });
        }
    }
    if let Some((speed, growth)) = ndjson {
        let mut o = Outcome::new("W1", "zstd-1 alone on voltail's NDJSON", "zstd crate");
        o.measure("input MiB per CPU-s", speed, "MiB/s", None);
        o.measure("NDJSON bytes per input byte", growth, "x", None);
        o.notes.push(
            "what the compress stage faces: the events voltail writes (envelope, path, tags) \
             compressed alone, as input MiB per CPU-second"
                .into(),
        );
        outcomes.push(o);
    }
    ctx.cleanup(&base);
    Ok(())
}

/// Catch-up, then CPU and RSS over an idle window.
fn idle(
    ctx: &Ctx,
    c: &Collector,
    tree: &Tree,
    dir: &Path,
    opts: &RunOpts,
    o: &mut Outcome,
) -> Result<Running> {
    let s = ctx.sizes;
    let mut r = c.start(&tree.root, dir, ctx.args.poll_interval, opts)?;
    let caught = r.wait_lines(tree.total_lines(), s.patience)?;
    o.measure("catch-up", caught.as_secs_f64(), "s", None);
    Ok(r)
}

fn w2(ctx: &Ctx, outcomes: &mut Vec<Outcome>) -> Result<()> {
    let s = ctx.sizes;
    let base = ctx.fresh("w2")?;
    let tree = Tree::create(&base.join("root"), s.w2_dirs, 5, s.w2_file_bytes, 2)?;
    for c in &ctx.collectors {
        let o = Outcome::new("W2", "idle", c.name());
        attempt(outcomes, o, |o| {
            let dir = base.join(c.name());
            let mut r = idle(ctx, c, &tree, &dir, &RunOpts::default(), o)?;
            // Let the last batch go before the windows.
            std::thread::sleep(Duration::from_secs(2).min(s.w2_window));
            // Two windows: right after catch-up, while the files back off (1, 2, 4, 8, 10 s)
            // and the freshly generated directories are too young to trust their stamps; then
            // idle, which is what the target is about.
            let window = |r: &mut Running| -> Result<f64> {
                let (c0, t0) = (r.proc.cpu(), Instant::now());
                std::thread::sleep(s.w2_window);
                r.check_alive()?;
                let cpu = r.proc.cpu().saturating_sub(c0).as_secs_f64();
                Ok(100.0 * cpu / t0.elapsed().as_secs_f64())
            };
            let settling = window(&mut r)?;
            let idle = window(&mut r)?;
            let (rss, hwm) = r.proc.mem();
            let voltail = r.is_voltail();
            o.measure("CPU, first window after catch-up", settling, "% core", None);
            o.measure(
                "CPU",
                idle,
                "% core",
                if voltail { Target::at_most(0.5) } else { None },
            );
            o.measure(
                "RSS",
                rss as f64 / 1024.0,
                "MiB",
                if voltail { Target::at_most(64.0) } else { None },
            );
            o.measure("peak RSS", hwm as f64 / 1024.0, "MiB", None);
            o.notes.push(format!(
                "{} files in {} dirs, {} lines; two windows of {:?} from 2 s after catch-up: \
                 CPU is the second (idle: every file backed off), RSS at its end",
                tree.rel.len(),
                s.w2_dirs,
                tree.total_lines(),
                s.w2_window
            ));
            r.stop()?;
            let v = r.verify(&tree)?;
            ctx.cleanup(&dir);
            judge(o, v)
        });
    }
    ctx.cleanup(&base);
    Ok(())
}

/// Latencies (ms) of lines stamped at or after `since_ms`, collected by a follower thread.
struct LatencyProbe {
    stop: Arc<AtomicBool>,
    lat: Arc<Mutex<Vec<u64>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl LatencyProbe {
    fn start(mut f: Follower, since_ms: u64) -> LatencyProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let lat = Arc::new(Mutex::new(Vec::new()));
        let (s, l) = (stop.clone(), lat.clone());
        let handle = std::thread::spawn(move || {
            let mut local = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let _ = f.poll(|line| {
                    if let Some(p) = crate::nginx::parse_line(line) {
                        if p.unix_ms >= since_ms {
                            local.push(now_ms().saturating_sub(p.unix_ms));
                        }
                    }
                });
                if !local.is_empty() {
                    l.lock().expect("latency lock").append(&mut local);
                }
                // Each line's latency is read late by up to this much: 1 ms keeps that below
                // the resolution of the probe row's 20 ms target (10 ms added ~5 ms to its p99).
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        LatencyProbe {
            stop,
            lat,
            handle: Some(handle),
        }
    }

    fn seen(&self) -> usize {
        self.lat.lock().expect("latency lock").len()
    }

    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        let mut v = std::mem::take(&mut *self.lat.lock().expect("latency lock"));
        v.sort_unstable();
        v
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64
}

/// W3 on `tree` (whose files already hold a few lines): appends, latency, CPU.
#[allow(clippy::too_many_arguments)] // reason: one call site per workload, all named
fn steady(
    ctx: &Ctx,
    c: &Collector,
    tree: &mut Tree,
    source: &Path,
    dir: &Path,
    opts: &RunOpts,
    time: Duration,
    targets: (Option<f64>, Option<f64>),
    o: &mut Outcome,
) -> Result<()> {
    let (cpu_target, p99_target) = targets;
    let s = ctx.sizes;
    let mut r = c.start(source, dir, ctx.args.poll_interval, opts)?;
    let caught = r.wait_lines(tree.total_lines(), s.patience)?;
    o.measure("catch-up of seed lines", caught.as_secs_f64(), "s", None);
    let before = tree.total_lines();
    let since = now_ms();
    let probe = LatencyProbe::start(r.follower(), since);
    let (c0, t0) = (r.proc.cpu(), Instant::now());
    let stop = AtomicBool::new(false);
    tree.append(s.w3_rate, time, 4, &stop)?;
    let cpu = r.proc.cpu().saturating_sub(c0).as_secs_f64();
    let wall = t0.elapsed().as_secs_f64();
    r.check_alive()?;
    backend_note(o, &r);
    let appended = tree.total_lines() - before;
    // Wait for the tail to arrive.
    let deadline = Instant::now() + s.patience;
    while (probe.seen() as u64) < appended && Instant::now() < deadline {
        r.check_alive()?;
        if r.proc.exited().is_some() {
            // A peer that finished on its own will not deliver more.
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let behind = appended.saturating_sub(probe.seen() as u64);
    let lat = probe.finish();
    let voltail = r.is_voltail();
    o.measure(
        "CPU",
        100.0 * cpu / wall,
        "% core",
        cpu_target.filter(|_| voltail).and_then(Target::at_most),
    );
    if !lat.is_empty() {
        o.measure("latency p50", pct(&lat, 0.5) / 1000.0, "s", None);
        o.measure(
            "latency p99",
            pct(&lat, 0.99) / 1000.0,
            "s",
            p99_target.filter(|_| voltail).and_then(Target::at_most),
        );
        o.measure(
            "latency max",
            lat.last().copied().unwrap_or(0) as f64 / 1000.0,
            "s",
            None,
        );
    }
    o.notes.push(format!(
        "{} files x {} lines/s for {:?}: {appended} lines, {} seen by the latency probe",
        tree.rel.len(),
        s.w3_rate,
        time,
        lat.len()
    ));
    if behind > 0 {
        o.notes.push(format!(
            "{behind} lines still not in the output {:?} after the writers stopped",
            s.patience
        ));
    }
    r.stop()?;
    let v = r.verify(tree)?;
    judge(o, v)
}

fn w3(ctx: &Ctx, outcomes: &mut Vec<Outcome>) -> Result<()> {
    let base = ctx.fresh("w3")?;
    for c in &ctx.collectors {
        let o = Outcome::new("W3", "steady", c.name());
        attempt(outcomes, o, |o| {
            let targets = (Some(5.0), Some(ctx.args.poll_interval.as_secs_f64() + 0.1));
            steady_fresh(ctx, c, &base, c.name(), &RunOpts::default(), targets, o)
        });
    }
    w3_probe(ctx, &base, outcomes)?;
    ctx.cleanup(&base);
    Ok(())
}

/// [`steady`] on a W3 tree of its own (`root-NAME` under `base`), the collector's files in
/// `base/NAME`. The tree's files get seed lines, so each is past its fingerprint before the
/// clock starts.
fn steady_fresh(
    ctx: &Ctx,
    c: &Collector,
    base: &Path,
    name: &str,
    opts: &RunOpts,
    targets: (Option<f64>, Option<f64>),
    o: &mut Outcome,
) -> Result<()> {
    let s = ctx.sizes;
    let mut tree = Tree::create(&base.join(format!("root-{name}")), s.w3_files, 1, 600, 3)?;
    let dir = base.join(name);
    let root = tree.root.clone();
    let r = steady(ctx, c, &mut tree, &root, &dir, opts, s.w3_time, targets, o);
    ctx.cleanup(&dir);
    r
}

/// Every poll interval of W3's probe variant: so long that the latency is the probe's.
const PROBE_POLLS: Duration = Duration::from_secs(10);
/// Poll interval of the row that reaches the probe row's latency by polling alone.
const FAST_POLLS: Duration = Duration::from_millis(10);
/// Batch linger of W3's probe variant: the default 100 ms alone would exceed the 20 ms target.
/// A line waits up to the probe's batch window (default 10 ms) to be read; with no linger
/// each round's lines ship at once, one batch per window (a linger as long as the window
/// would add its own wait for no fewer batches).
const PROBE_LINGER: Duration = Duration::ZERO;

/// W3 with the probe on and every poll at [`PROBE_POLLS`] (the writers are local, so the probe
/// sees every write), then the probe's cost on a W1-style writer at full speed, one `write` per
/// line and 64 KiB writes. Where the probe cannot load it says why and skips, except under
/// `CI=true`, where that fails the bench.
fn w3_probe(ctx: &Ctx, base: &Path, outcomes: &mut Vec<Outcome>) -> Result<()> {
    let c = &ctx.collectors[0];
    if let Some(why) = crate::probe_cost::unavailable() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            bail!("the probe rows must run under CI=true, but the probe cannot load: {why}");
        }
        eprintln!("bench: W3 probe rows skipped: {why}");
        let mut o = Outcome::new("W3", "probe", c.name());
        o.notes
            .push(format!("skipped: the probe cannot load here: {why}"));
        outcomes.push(o);
        return Ok(());
    }
    // The target: CPU no higher than W3 without the probe, measured just before.
    let cpu_without = outcomes
        .iter()
        .find(|o| o.workload == "W3" && o.variant == "steady" && o.collector == c.name())
        .and_then(|o| o.measures.iter().find(|m| m.name == "CPU"))
        .map_or(5.0, |m| m.value);
    let o = Outcome::new("W3", "steady, probe on, polls 10 s, linger 0", c.name());
    let opts = RunOpts {
        poll_interval: Some(PROBE_POLLS),
        max_poll_interval: Some(PROBE_POLLS),
        probe_poll_interval: Some(PROBE_POLLS),
        linger: Some(PROBE_LINGER),
        ..RunOpts::default()
    };
    attempt(outcomes, o, |o| {
        steady_fresh(
            ctx,
            c,
            base,
            "voltail-probe",
            &opts,
            (Some(cpu_without), Some(0.020)),
            o,
        )
    });
    // What the probe row's latency costs without the probe: every file polled as often as
    // a 20 ms p99 needs. No target; it shows what the probe buys.
    let o = Outcome::new("W3", "steady, probe off, polls 10 ms, linger 0", c.name());
    let opts = RunOpts {
        poll_interval: Some(FAST_POLLS),
        max_poll_interval: Some(FAST_POLLS),
        linger: Some(PROBE_LINGER),
        ..RunOpts::default()
    };
    attempt(outcomes, o, |o| {
        steady_fresh(ctx, c, base, "voltail-fastpoll", &opts, (None, None), o)
    });
    let (phase, rounds) = if ctx.args.quick {
        (Duration::from_millis(500), 1)
    } else {
        // Many short rounds: the cost is the median of the rounds' ratios, so more rounds
        // make it steadier while the time stays that of 3 x 5 s.
        (Duration::from_millis(1500), 10)
    };
    let dir = base.join("probe-cost");
    std::fs::create_dir_all(&dir)?;
    for (style, variant) in [
        (
            crate::probe_cost::Style::LinePerWrite,
            "probe cost, write per line",
        ),
        (
            crate::probe_cost::Style::Buffered,
            "probe cost, 64 KiB writes",
        ),
    ] {
        let o = Outcome::new("W3", variant, "writer");
        attempt(outcomes, o, |o| {
            let cost = crate::probe_cost::measure(&dir, style, phase, rounds)?;
            let (off, floor, on) = (
                cost.off.ns_per_line(),
                cost.floor.ns_per_line(),
                cost.on.ns_per_line(),
            );
            o.measure("writer CPU per line, probe off", off, "ns", None);
            o.measure(
                "writer CPU per line, empty sys_exit program",
                floor,
                "ns",
                None,
            );
            o.measure("writer CPU per line, probe on", on, "ns", None);
            o.measure(
                "probe cost (CPU per line, median of the rounds)",
                100.0 * (cost.on_ratio - 1.0),
                "%",
                Target::at_most(5.0),
            );
            o.measure(
                "of which the kernel's floor (empty program)",
                100.0 * (cost.floor_ratio - 1.0),
                "%",
                None,
            );
            o.measure(
                "probe cost, ratio of the totals",
                100.0 * (on / off - 1.0),
                "%",
                None,
            );
            o.measure(
                "lines/s, probe off",
                cost.off.lines_per_s(),
                "lines/s",
                None,
            );
            o.measure("lines/s, probe on", cost.on.lines_per_s(), "lines/s", None);
            o.notes.push(format!(
                "nginx lines at full speed, {rounds} x ({phase:?} off, {phase:?} empty program, \
                 {phase:?} on) alternating and a last {phase:?} off, the cost the median of the \
                 rounds' on/off (off interpolated from the off phases around each round); \
                 probe attached as {:?}; {} writes and {} events while on",
                cost.attach, cost.on.writes, cost.events
            ));
            Ok(())
        });
    }
    Ok(())
}

fn w4(ctx: &Ctx, outcomes: &mut Vec<Outcome>) -> Result<()> {
    let s = ctx.sizes;
    let base = ctx.fresh("w4")?;
    let Collector::Voltail { bin } = &ctx.collectors[0] else {
        bail!("voltail is always the first collector");
    };
    let voltail = Collector::Voltail { bin: bin.clone() };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/fuse").exists() {
        let mut o = Outcome::new("W4", "skipped", "voltail");
        o.notes.push(
            "skipped: the slow-NAS stand-in mounts FUSE, which needs root and /dev/fuse".into(),
        );
        eprintln!("bench: W4 skipped: mounting FUSE needs root and /dev/fuse");
        outcomes.push(o);
        return Ok(());
    }
    let nas_opts = crate::slownas::Options {
        latency: ctx.args.latency,
        threads: ctx.args.fuse_threads,
        ..Default::default()
    };
    let slownas_note = format!(
        "{:?} per lookup/getattr/open/read/readdir, {} worker threads",
        ctx.args.latency, ctx.args.fuse_threads
    );
    for reader in ["io_uring", "pread"] {
        // W2 through the stand-in: catch-up, then the poll round with every file due each round.
        let o = Outcome::new("W4", &format!("W2 {reader}"), "voltail");
        attempt(outcomes, o, |o| {
            let src = base.join(format!("w2-src-{reader}"));
            let tree = Tree::create(&src, s.w4_dirs, 5, s.w2_file_bytes, 4)?;
            let mnt = base.join(format!("w2-mnt-{reader}"));
            std::fs::create_dir_all(&mnt)?;
            let nas = SlowNas::mount(&src, &mnt, nas_opts.clone())?;
            let dir = base.join(format!("w2-run-{reader}"));
            let opts = RunOpts {
                reader,
                max_poll_interval: Some(ctx.args.poll_interval),
                ..Default::default()
            };
            let mut r = voltail.start(nas.mount_point(), &dir, ctx.args.poll_interval, &opts)?;
            let caught = r.wait_lines(tree.total_lines(), s.patience)?;
            o.measure("catch-up", caught.as_secs_f64(), "s", Target::at_most(15.0));
            std::thread::sleep(Duration::from_secs(1));
            let m0 = scrape(r.port).unwrap_or_default();
            nas.stats().record(true);
            let ops0 = nas.stats().total();
            // At least the window; longer (up to 6x) until 3 rounds covered every file, so a
            // slow backend's round is measured too.
            let t0 = Instant::now();
            let all = tree.rel.len();
            let gap = ctx.args.poll_interval / 2;
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let el = t0.elapsed();
                if el >= s.w4_round_window * 6
                    || (el >= s.w4_round_window
                        && rounds(&nas.stats().touches(), all, gap).len() >= 3)
                {
                    break;
                }
                r.check_alive()?;
            }
            let window = t0.elapsed();
            nas.stats().record(false);
            let ops = nas.stats().total() - ops0;
            r.check_alive()?;
            let touches = nas.stats().take_touches();
            if let Some(p) = std::env::var_os("XTASK_DUMP_TOUCHES") {
                let t0 = touches.first().map(|t| t.0);
                let text: String = touches
                    .iter()
                    .map(|(t, i)| {
                        format!(
                            "{:.3} {i}\n",
                            (*t - t0.unwrap_or(*t)).as_secs_f64() * 1000.0
                        )
                    })
                    .collect();
                let _ = std::fs::write(p, text);
            }
            let mut full = rounds(&touches, all, gap);
            // The first one started mid-round; keep it only when it is all there is.
            if full.len() > 1 {
                full.remove(0);
            }
            full.sort();
            if full.is_empty() {
                // No round finished inside the window: estimate it from the share of the files
                // the window covered (a lower bound when the window caught only part of one).
                let mut seen: Vec<u64> = touches.iter().map(|t| t.1).collect();
                seen.sort_unstable();
                seen.dedup();
                let est = window.as_secs_f64() * all as f64 / seen.len().max(1) as f64;
                o.measure(
                    &format!("poll round, {all} files (estimated: no round finished)"),
                    est.max(window.as_secs_f64()) * 1000.0,
                    "ms",
                    if reader == "io_uring" {
                        Target::at_most(300.0)
                    } else {
                        None
                    },
                );
                o.notes.push(format!(
                    "no round covered all {all} files within the {window:.1?} window ({} touches of {} files)",
                    touches.len(),
                    seen.len()
                ));
            } else {
                o.measure(
                    &format!("poll round, {all} files (FS side, median)"),
                    full[full.len() / 2].as_secs_f64() * 1000.0,
                    "ms",
                    if reader == "io_uring" {
                        Target::at_most(300.0)
                    } else {
                        None
                    },
                );
            }
            if let Some(d) = daemon_round(&m0, &scrape(r.port).unwrap_or_default()) {
                o.measure(
                    "poll round (voltail_poll_round_seconds mean)",
                    d * 1000.0,
                    "ms",
                    None,
                );
            }
            backend_note(o, &r);
            o.measure(
                "FS ops/s while idle",
                ops as f64 / window.as_secs_f64(),
                "ops/s",
                None,
            );
            o.notes.push(format!(
                "{} files in {} dirs through the stand-in ({slownas_note}); {} full rounds in the {window:.1?} window",
                all,
                s.w4_dirs,
                full.len(),
            ));
            r.stop()?;
            // The checker compares `file` with paths relative to the root: the mount's do.
            let v = r.verify(&tree)?;
            drop(nas);
            ctx.cleanup(&dir);
            ctx.cleanup(&src);
            judge(o, v)
        });
        let o = Outcome::new("W4", &format!("W3 {reader}"), "voltail");
        attempt(outcomes, o, |o| {
            let src = base.join(format!("w3-src-{reader}"));
            let mut tree = Tree::create(&src, s.w4_w3_files, 1, 600, 5)?;
            let mnt = base.join(format!("w3-mnt-{reader}"));
            std::fs::create_dir_all(&mnt)?;
            let nas = SlowNas::mount(&src, &mnt, nas_opts.clone())?;
            let dir = base.join(format!("w3-run-{reader}"));
            let opts = RunOpts {
                reader,
                ..Default::default()
            };
            // Writers append to the source (pods on other nodes); voltail reads the mount.
            let mount = nas.mount_point().to_path_buf();
            let r = steady_mounted(ctx, &voltail, &mut tree, &mount, &dir, &opts, o);
            drop(nas);
            ctx.cleanup(&dir);
            ctx.cleanup(&src);
            o.notes
                .push(format!("through the stand-in ({slownas_note})"));
            r
        });
    }
    ctx.cleanup(&base);
    Ok(())
}

/// W3 where voltail reads `mount` while the writers append to `tree.root`; the checker expects
/// the mount's paths.
fn steady_mounted(
    ctx: &Ctx,
    c: &Collector,
    tree: &mut Tree,
    mount: &Path,
    dir: &Path,
    opts: &RunOpts,
    o: &mut Outcome,
) -> Result<()> {
    let s = ctx.sizes;
    // The checker compares `file` with paths relative to the root, so the root does not matter.
    steady(
        ctx,
        c,
        tree,
        mount,
        dir,
        opts,
        s.w4_w3_time,
        (None, Some(1.5)),
        o,
    )
}

/// On SIGINT/SIGTERM: kill the collectors we started and unmount the stand-ins, then exit,
/// so an interrupted bench leaves no daemon or dead mount behind.
fn interrupt_cleanup() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            eprintln!("bench: interrupted: stopping collectors and unmounting");
            crate::runner::kill_all();
            crate::slownas::unmount_all();
            std::process::exit(128 + sig);
        }
    });
    Ok(())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn voltail_bin(args: &BenchArgs) -> Result<PathBuf> {
    if let Some(b) = &args.bin {
        return Ok(b.clone());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("bench: building voltail (cargo build --release -p voltail)");
    let st = Command::new(cargo)
        .args(["build", "--release", "-p", "voltail"])
        .current_dir(workspace())
        .status()
        .context("run cargo build")?;
    if !st.success() {
        bail!("cargo build --release -p voltail failed");
    }
    Ok(target_dir().join("release").join("voltail"))
}

fn parse_peer(s: &str) -> Result<Collector> {
    let (name, cmd) = s
        .split_once('=')
        .with_context(|| format!("--peer {s:?}: expected NAME=CMD"))?;
    if name.is_empty() || name == "voltail" || cmd.trim().is_empty() {
        bail!("--peer {s:?}: expected NAME=CMD with a name other than voltail");
    }
    Ok(Collector::Peer {
        name: name.into(),
        cmd: cmd.into(),
    })
}

/// Rewrites `docs/benchmarks.md` from `report`, keeping the page's hand-written part.
fn write_docs(report: &Report) -> Result<()> {
    let docs = workspace().join("docs");
    std::fs::create_dir_all(&docs)?;
    let page = docs.join("benchmarks.md");
    let previous = std::fs::read_to_string(&page).ok();
    std::fs::write(&page, report.markdown(previous.as_deref()))?;
    println!("wrote {}", page.display());
    Ok(())
}

/// Runs the bench (or, with `--render-docs`, only renders a saved run).
pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(json) = &args.render_docs {
        let text =
            std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
        let report: Report = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a bench run's results.json", json.display()))?;
        return write_docs(&report);
    }
    let sizes = if args.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    let only: Vec<String> = args.only.iter().map(|s| s.trim().to_uppercase()).collect();
    for w in &only {
        if !["W1", "W2", "W3", "W4"].contains(&w.as_str()) {
            bail!("--only {w}: workloads are W1, W2, W3, W4");
        }
    }
    let want = |w: &str| only.is_empty() || only.iter().any(|x| x == w);
    let load_start = crate::report::loadavg();
    interrupt_cleanup()?;
    let bin = voltail_bin(&args)?;
    if !bin.exists() {
        bail!("no voltail binary at {}", bin.display());
    }
    let version = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(workspace())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut collectors = vec![Collector::Voltail { bin: bin.clone() }];
    for p in &args.peer {
        collectors.push(parse_peer(p)?);
    }
    let tmp = tempfile::Builder::new()
        .prefix("voltail-bench-")
        .tempdir_in(args.work_dir.clone().unwrap_or_else(std::env::temp_dir))?;
    let work = if args.keep {
        tmp.keep()
    } else {
        tmp.path().to_path_buf()
    };
    let ctx = Ctx {
        args: args.clone(),
        sizes,
        work,
        collectors,
    };
    let mut outcomes = Vec::new();
    type Workload = fn(&Ctx, &mut Vec<Outcome>) -> Result<()>;
    let workloads: [(&str, Workload); 4] = [("W1", w1), ("W2", w2), ("W3", w3), ("W4", w4)];
    for (name, f) in workloads {
        if want(name) {
            if let Err(e) = f(&ctx, &mut outcomes) {
                let mut o = Outcome::new(name, "setup", "-");
                o.ok = false;
                o.error = Some(format!("{e:#}"));
                eprintln!("bench: {name} setup FAILED: {e:#}");
                outcomes.push(o);
            }
        }
    }
    let mut command = String::from("cargo xtask bench");
    if args.quick {
        command.push_str(" --quick");
    }
    if !args.only.is_empty() {
        command.push_str(&format!(" --only {}", args.only.join(",")));
    }
    if args.fuse_threads != 64 {
        command.push_str(&format!(" --fuse-threads {}", args.fuse_threads));
    }
    if args.latency != Duration::from_millis(1) {
        command.push_str(&format!(
            " --latency {}",
            humantime::format_duration(args.latency)
        ));
    }
    let report = Report {
        machine: Machine::detect(),
        command,
        quick: args.quick,
        date: crate::nginx::rfc3339(now_ms()),
        voltail: format!("{version} ({commit})"),
        slownas: format!(
            "{:?} per lookup/getattr/open/read/readdir, {} worker threads",
            args.latency, args.fuse_threads
        ),
        load: (load_start, crate::report::loadavg()),
        outcomes,
    };
    println!("\n{}\n", report.machine.describe());
    println!("{}", report.table());
    let json_dir = target_dir().join("bench");
    std::fs::create_dir_all(&json_dir)?;
    let json = json_dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    println!("results: {}", json.display());
    if args.write_docs {
        write_docs(&report)?;
    }
    if args.keep {
        println!("kept the workloads in {}", ctx.work.display());
    }
    let failed: Vec<String> = report
        .outcomes
        .iter()
        .filter(|o| !o.ok)
        .map(|o| format!("{} {} {}", o.workload, o.variant, o.collector))
        .collect();
    if !failed.is_empty() {
        bail!("{} workload(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cat_peer_runs_and_is_verified() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = Tree::create(&dir.path().join("root"), 3, 2, 5000, 1).expect("tree");
        let peer = parse_peer("cat=cat {dir}/*/*/*.log > {out}").expect("parses");
        let mut r = peer
            .start(
                &tree.root,
                &dir.path().join("run"),
                Duration::from_secs(1),
                &RunOpts::default(),
            )
            .expect("starts");
        r.wait_lines(tree.total_lines(), Duration::from_secs(30))
            .expect("delivers");
        // cat exits once it has copied everything: stopping it before it has would kill it
        // (the lines can be in the output a moment before the shell exits).
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.proc.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let e = r.stop().expect("stops");
        assert!(e.status.success(), "{:?}", e.status);
        let v = r.verify(&tree).expect("verifies");
        assert!(v.ok(), "{}", v.describe());
        assert_eq!(v.delivered, tree.total_lines());
    }

    #[test]
    fn a_peer_that_loses_lines_fails_the_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = Tree::create(&dir.path().join("root"), 2, 1, 5000, 1).expect("tree");
        let peer = parse_peer("half=cat {dir}/*/*/*.log | sed -n 'p;n' > {out}").expect("parses");
        let mut r = peer
            .start(
                &tree.root,
                &dir.path().join("run"),
                Duration::from_secs(1),
                &RunOpts::default(),
            )
            .expect("starts");
        r.wait_lines(tree.total_lines(), Duration::from_secs(30))
            .expect("ends");
        r.stop().expect("stops");
        let mut o = Outcome::new("W1", "none", "half");
        let v = r.verify(&tree).expect("verifies");
        assert!(v.missing > 0);
        assert!(judge(&mut o, v).is_err());
    }

    #[test]
    fn peers_need_a_name_and_a_command() {
        assert!(parse_peer("nocommand").is_err());
        assert!(parse_peer("voltail=cat {dir}").is_err());
        assert!(parse_peer("x=").is_err());
    }
}
