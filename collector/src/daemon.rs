//! The daemon: wires the stages into threads and queues, and runs them until told to stop.
//!
//! ```text
//!  reader (this thread)          compressor thread          uploader thread
//!  discover/poll/read/frame  ->  zstd, one frame/batch  ->  sink.send, acks -> checkpoint
//!        bounded queue (crossbeam)        bounded queue
//! ```
//! Without compression there is no compressor thread: the reader's queue is the uploader's.
//! Start-up: metrics endpoint, then the `data_dir` lock (waiting while another instance holds
//! it), the checkpoint, the sink's recovery to the checkpointed cursor, the read backend. On
//! SIGTERM/SIGINT the reader stops reading and hands on its open batch; the queues drain; the
//! uploader delivers what is in flight and writes a last checkpoint. If that takes longer than
//! `shutdown_timeout`, the undelivered remainder is left unacknowledged (it is read again on
//! the next start) and the process exits anyway.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError, SendTimeoutError};

use crate::batch::{Batch, BatchBuilder, BatchLimits, Compressor};
use crate::checkpoint::{LoadOutcome, State, Store};
use crate::config::Config;
use crate::discovery::Discovery;
use crate::lag::LagBoard;
use crate::metrics::{Events, Health, Status};
use crate::tail::{Exit, SourceRt, Tailer, TailerOptions, TailerParts};
use crate::uploader::{UploadExit, Uploader};

/// Threads discovery makes its listings and stats on, on a network volume.
const DISCOVERY_THREADS: usize = 32;

/// Start-up failures (the only errors that stop the process).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// `data_dir` could not be created.
    #[error("cannot create data_dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The lock failed (not: is held).
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    /// The checkpoint could not be opened or created.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// The sink could not be built or recovered.
    #[error(transparent)]
    Sink(#[from] crate::sink::SinkError),
    /// A source did not compile.
    #[error("source: {0}")]
    Source(String),
    /// Discovery could not be built.
    #[error(transparent)]
    Discovery(#[from] crate::discovery::DiscoveryError),
    /// A thread could not be started.
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    /// `probe = "on"` and the eBPF probe cannot run.
    #[error("probe = \"on\" but the eBPF probe cannot run: {0}")]
    Probe(#[from] voltail_ebpf::ProbeError),
}

/// Process-wide handles the daemon reports through.
#[derive(Debug, Clone)]
pub struct Context {
    /// Metrics.
    pub events: Events,
    /// Status for `/health` and `/ready`.
    pub health: Arc<Health>,
    /// Set by SIGTERM/SIGINT.
    pub stop: Arc<AtomicBool>,
}

/// Raises the soft open-file limit to the hard one: one descriptor per tracked file.
pub fn raise_fd_limit() {
    // SAFETY: rlimit is plain old data, and getrlimit/setrlimit only read/write it.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Runs the collector until `ctx.stop` is set and the drain is over.
pub fn run(cfg: &Config, ctx: &Context) -> Result<(), DaemonError> {
    raise_fd_limit();
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| DaemonError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let health = Arc::clone(&ctx.health);
    let lock = crate::lock::acquire(&cfg.data_dir, &ctx.stop, |holder| {
        tracing::warn!(holder, data_dir = %cfg.data_dir.display(), "another instance holds the data_dir lock; waiting");
        health.set(Status::WaitingForLock {
            holder: holder.to_string(),
        });
    })?;
    let Some(_lock) = lock else {
        tracing::info!("stopped while waiting for the lock");
        return Ok(());
    };
    ctx.health.set(Status::Starting);
    let events = ctx.events.clone();

    let (mut store, loaded) = Store::open(&cfg.data_dir)?;
    let outcome = match &loaded.outcome {
        LoadOutcome::Fresh => {
            tracing::info!(path = %store.path().display(), "no checkpoint: first start");
            "fresh"
        }
        LoadOutcome::Clean { generation } => {
            tracing::info!(path = %store.path().display(), generation, files = loaded.entries.len(), "checkpoint loaded");
            "clean"
        }
        LoadOutcome::Recovered { problem, from } => {
            tracing::warn!(path = %store.path().display(), problem, from, files = loaded.entries.len(),
                "checkpoint was damaged; recovered (the damaged file is kept as checkpoint.bin.corrupt-*)");
            "recovered"
        }
        LoadOutcome::Lost { problem } => {
            tracing::error!(path = %store.path().display(), problem,
                "checkpoint unreadable and no backup: every file is read again from the beginning (duplicates, no loss)");
            "lost"
        }
    };
    events.checkpoint_loaded(outcome);

    let mut lanes = crate::sink::build_lanes(cfg)?;
    for sink in &mut lanes {
        sink.recover(loaded.cursor.as_deref())?;
    }
    // The loaded entries stay in the checkpoint under these keys until the tailer matches
    // each to a file (same key) or finds it gone (released).
    let mut state = State::default();
    state.cursor = loaded.cursor.clone().unwrap_or_default();
    let restore: Vec<(u64, crate::checkpoint::Entry)> = loaded
        .entries
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, e)| (i as u64 + 1, e))
        .collect();
    for (k, e) in &restore {
        state.entries.insert(*k, e.clone());
    }
    // The sink's position goes into the checkpoint before anything is shipped: a crash before
    // the first periodic checkpoint must find it and cut the sink back to it, or whatever was
    // shipped meanwhile is shipped again (on a first start there was no cursor at all).
    let mut cursor = Vec::new();
    for (i, sink) in lanes.iter_mut().enumerate() {
        let c = sink.commit()?;
        if i == 0 {
            cursor = c;
        }
    }
    state.cursor = cursor;
    store.write(&state)?;
    state.mark_clean();

    let sources = cfg
        .sources
        .iter()
        .map(SourceRt::new)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| DaemonError::Source(e.to_string()))?;
    let mut discovery = Discovery::new(&cfg.sources, cfg.shard())?;
    let selected = crate::tail::select::select(cfg.reader, discovery.bases());
    // On a network volume every listing and stat of discovery is a round trip: overlap them.
    if selected.network {
        discovery.set_io_threads(DISCOVERY_THREADS);
    }
    tracing::info!(backend = selected.name, reason = %selected.reason, "read backend");
    let backend = selected.backend;

    let q = cfg.batch.queue_batches;
    let (ready_tx, ready_rx) = bounded::<Batch>(q);
    let (hint_tx, hint_rx) = crate::tail::hints::mailbox(4096);
    // The probe watches the devices of the include roots (writes by processes on this node).
    let mut devices: Vec<u64> = discovery
        .roots()
        .iter()
        .filter_map(|r| std::fs::metadata(r).ok())
        .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
        .collect();
    devices.sort_unstable();
    devices.dedup();
    let probe = crate::probe::spawn(
        cfg.probe,
        devices,
        cfg.probe_writer_tags,
        cfg.probe_batch_window.0,
        hint_tx,
        Arc::clone(&ctx.stop),
    )?;
    if probe.is_some() {
        tracing::info!(safety_poll = %humantime::format_duration(cfg.probe_poll_interval.0),
            "eBPF write probe active: local writes are read at once, polling slows down");
    }
    let give_up = Arc::new(AtomicBool::new(false));
    let lag = Arc::new(LagBoard::default());

    let (kind, level) = cfg.sink().compression();
    // Without compression the stage would only pass batches on, at a thread switch per
    // batch: the reader hands them to the uploader itself.
    let (reader_tx, compressor) = if kind == crate::config::Compression::None {
        (ready_tx, None)
    } else {
        let (raw_tx, raw_rx) = bounded::<Batch>(q);
        (
            raw_tx,
            Some(spawn_compressor(
                kind,
                level,
                raw_rx,
                ready_tx,
                Arc::clone(&give_up),
            )?),
        )
    };

    let uploader = Uploader::new(
        lanes,
        store,
        state,
        ready_rx,
        events.clone(),
        Arc::clone(&lag),
        cfg.checkpoint_interval.0,
        cfg.data_dir.clone(),
        Arc::clone(&give_up),
    );
    let (done_tx, done_rx) = bounded::<UploadExit>(1);
    let uploader = std::thread::Builder::new()
        .name("voltail-upload".into())
        .spawn(move || {
            let exit = uploader.run();
            let _ = done_tx.send(exit);
        })
        .map_err(DaemonError::Thread)?;

    let limits = BatchLimits {
        max_bytes: cfg.batch.max_bytes,
        max_events: cfg.batch.max_events,
        linger: cfg.batch.linger.0,
    };
    let mut tailer = Tailer::new(TailerParts {
        sources,
        discovery,
        backend,
        builder: BatchBuilder::new(limits, crate::sink::encoder(cfg.sink())),
        out: reader_tx,
        hints: hint_rx,
        events: events.clone(),
        lag,
        restore,
        opts: TailerOptions {
            first_start: loaded.outcome == LoadOutcome::Fresh,
            probe_poll_interval: probe.as_ref().map(|_| cfg.probe_poll_interval.0),
            shard: cfg.shard(),
        },
    });
    ctx.health.set(Status::Running);
    tracing::info!(sources = cfg.sources.len(), "collecting");

    // The deadline starts when the stop signal arrives; a watcher enforces it even while the
    // reader is blocked handing on a batch.
    let stop = Arc::clone(&ctx.stop);
    let gu = Arc::clone(&give_up);
    let timeout = cfg.shutdown_timeout.0;
    std::thread::Builder::new()
        .name("voltail-deadline".into())
        .spawn(move || {
            // Five looks a second: the deadline is seconds long, and an idle collector should
            // not wake for it twenty times a second (it was 6 % of W2's idle CPU).
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
            }
            std::thread::sleep(timeout);
            gu.store(true, Ordering::Relaxed);
        })
        .map_err(DaemonError::Thread)?;

    let exit = tailer.run(&ctx.stop, &give_up);
    ctx.health.set(Status::Stopping);
    let files = tailer.tracked();
    drop(tailer); // closes the reader's queue: the compressor and the uploader drain
    tracing::info!(files, reader = ?exit, "reading stopped; delivering what is in flight");
    let started = Instant::now();
    let upload = loop {
        match done_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(e) => break e,
            Err(RecvTimeoutError::Timeout) => {
                if give_up.load(Ordering::Relaxed) && started.elapsed() > Duration::from_secs(60) {
                    tracing::error!(
                        "uploader did not finish after the deadline; exiting without it"
                    );
                    return Ok(());
                }
            }
            Err(RecvTimeoutError::Disconnected) => break UploadExit::Abandoned,
        }
    };
    if let Some(p) = probe {
        p.stop();
    }
    if let Some(c) = compressor {
        let _ = c.join();
    }
    let _ = uploader.join();
    match (exit, upload) {
        (Exit::Stopped, UploadExit::Drained) => {
            tracing::info!("stopped cleanly: everything read was delivered")
        }
        _ => tracing::warn!(
            "stopped at the deadline: undelivered data will be read again on the next start"
        ),
    }
    Ok(())
}

/// The compressor stage: one zstd frame per batch, from the reader's queue to the uploader's,
/// until the reader's queue closes (or, while the uploader's is full, `give_up` is set).
fn spawn_compressor(
    kind: crate::config::Compression,
    level: i32,
    raw_rx: crossbeam_channel::Receiver<Batch>,
    ready_tx: crossbeam_channel::Sender<Batch>,
    gu: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, DaemonError> {
    std::thread::Builder::new()
        .name("voltail-compress".into())
        .spawn(move || {
            let mut c = Compressor::new(kind, level);
            while let Ok(mut b) = raw_rx.recv() {
                if let Err(e) = c.compress(&mut b) {
                    tracing::error!(error = %e, "compression failed; the sink gets the batch uncompressed");
                }
                let mut b = b;
                loop {
                    match ready_tx.send_timeout(b, Duration::from_millis(100)) {
                        Ok(()) => break,
                        Err(SendTimeoutError::Timeout(back)) if !gu.load(Ordering::Relaxed) => b = back,
                        Err(_) => return,
                    }
                }
            }
        })
        .map_err(DaemonError::Thread)
}
