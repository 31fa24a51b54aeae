//! `cargo xtask`: chores for voltail that are never needed to build or run it.
//!
//! - `bench` ([`bench`]): generates the workloads ([`workload`], [`nginx`]), runs the release
//!   `voltail` binary (and optional peers) on them ([`runner`]), verifies that every line
//!   arrived exactly once ([`verify`]), and reports ([`report`]).
//! - `slownas` ([`slownas`], in the library so the integration tests can mount it): the
//!   slow-NAS FUSE stand-in, mounted until SIGINT/SIGTERM, with faults read from a control file.
//! - `soak`: the soak of `tests/integration/soak.rs` (W3-style load, rotations, SIGKILLs) on
//!   a release build for N minutes, its table kept under `target/soak/`.

mod bench;
mod nginx;
mod probe_cost;
mod receiver;
mod report;
mod runner;
mod verify;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use xtask::slownas;

#[derive(Parser, Debug)]
#[command(name = "xtask", about = "voltail chores: bench, slownas, soak")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Generate the workloads, run voltail (and peers) on them, verify, report.
    Bench(bench::BenchArgs),
    /// Mount the slow-NAS stand-in: SOURCE seen at MOUNT with added latency, until SIGINT/SIGTERM.
    Slownas {
        /// Directory to expose.
        #[arg(long)]
        source: PathBuf,
        /// Where to mount it (an existing empty directory).
        #[arg(long)]
        mount: PathBuf,
        /// Added to each lookup, getattr, open, read and readdir.
        #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
        latency: Duration,
        /// Worker threads serving requests concurrently (an NFS client's RPC slots).
        #[arg(long, default_value_t = 64)]
        threads: usize,
        /// How long the kernel may cache names.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        entry_ttl: Duration,
        /// Open files with direct_io (bypass the page cache).
        #[arg(long)]
        direct_io: bool,
        /// A control file of faults to inject, re-read when it changes: one per line,
        /// `fail OPS ERRNO PATH` (e.g. `fail read,getattr ESTALE app/pod-1`) or `hide DIR`,
        /// paths relative to the mount root; an empty or missing file lifts them all.
        #[arg(long)]
        faults: Option<PathBuf>,
    },
    /// Soak: 200 files x 10 lines/s with rename rotations and SIGKILLs for N minutes, then
    /// check every line is in the sink exactly once and RSS, descriptors and checkpoint stayed
    /// bounded (release build; the table of samples goes to target/soak/).
    Soak {
        /// How long to write.
        #[arg(long, default_value_t = 60.0)]
        minutes: f64,
        /// SIGKILL and restart the collector about this often (jittered +-30 %); 0 = never.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        kill_every: Duration,
        /// Seed of the kill times (random when absent; printed).
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Bench(args) => bench::run(args),
        Cmd::Soak {
            minutes,
            kill_every,
            seed,
        } => soak(minutes, kill_every, seed),
        Cmd::Slownas {
            source,
            mount,
            latency,
            threads,
            entry_ttl,
            direct_io,
            faults,
        } => {
            let term = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, term.clone()).context("register signal")?;
            }
            let opts = slownas::Options {
                latency,
                threads,
                entry_ttl,
                direct_io,
            };
            let nas = slownas::SlowNas::mount(&source, &mount, opts)?;
            eprintln!(
                "slownas: {} mounted at {} ({:?} per operation, {} threads); Ctrl-C unmounts",
                source.display(),
                nas.mount_point().display(),
                latency,
                threads
            );
            let mut seen = None;
            while !term.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(control) = &faults {
                    // Re-read on any change of the file (or its appearing/vanishing).
                    let stamp = std::fs::metadata(control)
                        .ok()
                        .map(|m| (m.modified().ok(), m.len()));
                    if seen.as_ref() != Some(&stamp) {
                        match nas.faults().load(control) {
                            Ok(n) => eprintln!("slownas: {n} fault(s) in force"),
                            Err(e) => eprintln!("slownas: faults unchanged: {e:#}"),
                        }
                        seen = Some(stamp);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let ops = nas.stats().total();
            nas.unmount()?;
            eprintln!("slownas: unmounted after {ops} slow operations");
            Ok(())
        }
    }
}

/// Runs the `#[ignore]`d soak test on a release build and keeps its output.
fn soak(minutes: f64, kill_every: Duration, seed: Option<u64>) -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let dir = root.join("target/soak");
    std::fs::create_dir_all(&dir).context("mkdir target/soak")?;
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let log = dir.join(format!("soak-{secs}.log"));
    let mut cmd = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()));
    cmd.current_dir(&root)
        .args([
            "test",
            "-p",
            "voltail-tests",
            "--release",
            "--test",
            "integration",
            "--",
        ])
        .args(["--ignored", "--nocapture", "--exact", "soak::soak"])
        .env("VOLTAIL_SOAK_MINUTES", minutes.to_string())
        .env(
            "VOLTAIL_SOAK_KILL_EVERY_SECS",
            kill_every.as_secs_f64().to_string(),
        );
    if let Some(s) = seed {
        cmd.env("VOLTAIL_SEED", s.to_string());
    }
    eprintln!(
        "soak: {minutes} min, SIGKILL every ~{kill_every:?}; output also in {}",
        log.display()
    );
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("spawn cargo test")?;
    let out = child.stdout.take().context("stdout")?;
    let mut file =
        std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
        let line = line.context("read cargo output")?;
        println!("{line}");
        std::io::Write::write_all(&mut file, format!("{line}\n").as_bytes())?;
    }
    let st = child.wait().context("wait cargo test")?;
    anyhow::ensure!(st.success(), "soak failed ({st}); see {}", log.display());
    Ok(())
}
