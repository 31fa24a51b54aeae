//! `cargo xtask`: chores for voltail that are never needed to build or run it.
//!
//! - `bench` ([`bench`]): generates the workloads ([`workload`], [`nginx`]), runs the release
//!   `voltail` binary (and optional peers) on them ([`runner`]), verifies that every line
//!   arrived exactly once ([`verify`]), and reports ([`report`]).
//! - `slownas` ([`slownas`]): the slow-NAS FUSE stand-in, mounted until SIGINT/SIGTERM.

mod bench;
mod nginx;
mod report;
mod runner;
mod slownas;
mod verify;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "xtask", about = "voltail chores: bench, slownas")]
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
        Cmd::Slownas {
            source,
            mount,
            latency,
            threads,
            entry_ttl,
            direct_io,
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
            while !term.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let ops = nas.stats().total();
            nas.unmount()?;
            eprintln!("slownas: unmounted after {ops} slow operations");
            Ok(())
        }
    }
}
