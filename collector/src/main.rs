//! The `voltail` command: a thin shell over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use voltail::config::Config;

#[derive(Parser)]
#[command(
    name = "voltail",
    version,
    about = "Collects the log files of every pod on a shared volume"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Collect and ship until SIGTERM/SIGINT.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration and print it resolved, with every default.
    Check {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the checkpoint: one row per tracked file.
    Checkpoint {
        /// Configuration file (TOML): its data_dir holds the checkpoint.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Shard hand-over: re-deal the checkpoints of all sharded replicas for a new count.
    /// Every replica must be stopped (docs/operations.md, "Growing N").
    Reshard {
        /// The directory holding one data_dir per replica (`voltail-0`, `voltail-1`, ...).
        #[arg(long)]
        dir: PathBuf,
        /// The new number of replicas.
        #[arg(long)]
        count: u32,
    },
    /// Write nginx-like lines into pod-style directories (demo and load).
    Generate(voltail::generate::GenerateOptions),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VOLTAIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    Ok(stop)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("voltail: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Check { config } => match Config::load(&config) {
            Ok(cfg) => {
                print!("{}", cfg.to_toml());
                eprintln!("{}: ok", config.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("voltail: {e}");
                Ok(ExitCode::from(2))
            }
        },
        Cmd::Run { config } => {
            let cfg = Config::load(&config)?;
            let stop = stop_flag()?;
            let handle = voltail::metrics::install()?;
            let ctx = voltail::daemon::Context {
                events: voltail::metrics::Events::new(),
                health: Arc::new(voltail::metrics::Health::default()),
                stop,
            };
            if let Some(addr) = cfg.metrics_address() {
                let bound = voltail::metrics::serve(addr, handle, Arc::clone(&ctx.health))?;
                tracing::info!(address = %bound, "serving /metrics, /health and /ready");
            }
            voltail::daemon::run(&cfg, &ctx)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Checkpoint { config } => {
            let cfg = Config::load(&config)?;
            voltail::report::print_checkpoint(&cfg, &mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Reshard { dir, count } => {
            let r = voltail::handover::reshard(&dir, count)?;
            for (d, why) in &r.skipped {
                eprintln!(
                    "voltail: {}: checkpoint unreadable ({why}); its files are read again",
                    d.display()
                );
            }
            for (d, n) in &r.per_replica {
                println!("{}\t{n} files", d.display());
            }
            eprintln!(
                "voltail reshard: {} files from {} checkpoints dealt to {count} replicas ({} stale entries dropped)",
                r.files,
                r.peers.len(),
                r.stale
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Generate(o) => {
            let stop = stop_flag()?;
            let n = voltail::generate::run(&o, &stop)?;
            eprintln!("voltail generate: {n} lines written");
            Ok(ExitCode::SUCCESS)
        }
    }
}
