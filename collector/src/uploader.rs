//! The uploader: delivers batches to the sink in order and turns acknowledgements into the
//! checkpoint.
//!
//! For each batch: `send` until acknowledged. Transient failures are retried with exponential
//! backoff and jitter (honouring the backend's `Retry-After`), for as long as it takes: the
//! queue behind fills, the readers pause, and the files are the buffer. A permanent failure is
//! logged with the backend's reason, counted, and the batch written to `data_dir/dead-letter/`
//! so the pipeline moves on without losing it. Only then are the batch's file updates and acks
//! applied to the checkpoint [`State`]. Every `checkpoint_interval` (and at the end) the sink
//! commits (fsync) and the offsets are written together with the sink's cursor, so the
//! checkpoint never runs ahead of durable delivery.
//!
//! Batches are applied strictly in order: a batch that cannot be delivered before the shutdown
//! deadline stops the uploader, and nothing after it is acknowledged.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::batch::Batch;
use crate::checkpoint::{State, Store};
use crate::config::Compression;
use crate::lag::LagBoard;
use crate::metrics::Events;
use crate::sink::{Sink, SinkError, SinkErrorKind};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How the uploader ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadExit {
    /// The queue closed and everything in it was delivered.
    Drained,
    /// The shutdown deadline passed while a batch was still undelivered.
    Abandoned,
}

/// Delivers batches and keeps the checkpoint.
pub struct Uploader {
    sink: Box<dyn Sink>,
    store: Store,
    state: State,
    rx: Receiver<Batch>,
    events: Events,
    lag: Arc<LagBoard>,
    interval: Duration,
    dead_letter: PathBuf,
    give_up: Arc<AtomicBool>,
    last_current: Instant,
}

impl std::fmt::Debug for Uploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploader")
            .field("sink", &self.sink.name())
            .finish()
    }
}

/// Exponential backoff with ±50 % jitter for attempt `n` (0-based).
pub fn backoff(n: u32) -> Duration {
    let base = BACKOFF_MIN
        .saturating_mul(1u32 << n.min(16))
        .min(BACKOFF_MAX);
    let jitter = 0.5 + fastrand::f64();
    base.mul_f64(jitter).min(BACKOFF_MAX)
}

impl Uploader {
    /// An uploader over a recovered sink and an opened checkpoint.
    #[allow(clippy::too_many_arguments)] // the pipeline's tail end, wired once by the daemon
    pub fn new(
        sink: Box<dyn Sink>,
        store: Store,
        state: State,
        rx: Receiver<Batch>,
        events: Events,
        lag: Arc<LagBoard>,
        interval: Duration,
        data_dir: PathBuf,
        give_up: Arc<AtomicBool>,
    ) -> Uploader {
        Uploader {
            sink,
            store,
            state,
            rx,
            events,
            lag,
            interval,
            dead_letter: data_dir.join("dead-letter"),
            give_up,
            last_current: Instant::now(),
        }
    }

    /// Runs until the queue closes (or the deadline passes), then writes a last checkpoint.
    pub fn run(mut self) -> UploadExit {
        let mut next = Instant::now() + self.interval;
        let exit = loop {
            match self
                .rx
                .recv_timeout(next.saturating_duration_since(Instant::now()))
            {
                Ok(b) => {
                    if !self.deliver(b, &mut next) {
                        break UploadExit::Abandoned;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break UploadExit::Drained,
            }
            if Instant::now() >= next {
                self.checkpoint();
                next = Instant::now() + self.interval;
            }
        };
        self.checkpoint();
        exit
    }

    /// Delivers one batch, then applies it. Returns false when abandoned at shutdown.
    fn deliver(&mut self, b: Batch, next_checkpoint: &mut Instant) -> bool {
        let mut attempt = 0u32;
        loop {
            match self.sink.send(&b) {
                Ok(()) => {
                    self.events.sink_delivered(b.raw_bytes, b.payload.len());
                    if attempt > 0 {
                        tracing::info!(
                            sink = self.sink.name(),
                            batch = b.seq,
                            attempts = attempt + 1,
                            "delivered after retries"
                        );
                    }
                    break;
                }
                Err(e) if e.kind == SinkErrorKind::Transient => {
                    self.events.sink_error(e.sink, e.reason, true);
                    if attempt < 3 || attempt % 20 == 0 {
                        tracing::warn!(sink = e.sink, reason = e.reason, batch = b.seq, attempt, error = %e.message,
                            "delivery failed; retrying (reading pauses while the queue is full)");
                    }
                    let delay = e.retry_after.unwrap_or_else(|| backoff(attempt));
                    let until = Instant::now() + delay;
                    while Instant::now() < until {
                        if self.give_up.load(Ordering::Relaxed) {
                            tracing::error!(sink = e.sink, batch = b.seq,
                                "shutdown deadline passed with a batch undelivered; it will be read again after restart");
                            return false;
                        }
                        // Keep the checkpoint of what was delivered before current while waiting.
                        if Instant::now() >= *next_checkpoint {
                            self.checkpoint();
                            *next_checkpoint = Instant::now() + self.interval;
                        }
                        std::thread::sleep(
                            until
                                .saturating_duration_since(Instant::now())
                                .min(Duration::from_millis(50)),
                        );
                    }
                    attempt = attempt.saturating_add(1);
                }
                Err(e) => {
                    self.events.sink_error(e.sink, e.reason, false);
                    self.dead_letter(&b, &e);
                    break;
                }
            }
        }
        for u in &b.updates {
            self.state.apply(u);
        }
        for a in &b.acks {
            self.state.ack(a.key, a.offset);
        }
        self.lag.acked(b.acks.iter().map(|a| (a.key, a.offset)));
        for u in &b.releases {
            self.state.apply(u);
        }
        true
    }

    fn dead_letter(&mut self, b: &Batch, e: &SinkError) {
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let ext = match b.compression {
            Compression::Zstd => "ndjson.zst",
            Compression::Gzip => "ndjson.gz",
            Compression::None => "ndjson",
        };
        let name = format!("batch-{secs}-{}", b.seq);
        let data = self.dead_letter.join(format!("{name}.{ext}"));
        let why = self.dead_letter.join(format!("{name}.error"));
        let res = std::fs::create_dir_all(&self.dead_letter)
            .and_then(|()| std::fs::write(&data, &b.payload))
            .and_then(|()| std::fs::write(&why, format!("{e}\n")));
        match res {
            Ok(()) => {
                tracing::error!(sink = e.sink, reason = e.reason, error = %e.message, events = b.events.len(),
                file = %data.display(), "backend refused a batch; written to the dead-letter directory")
            }
            Err(io) => {
                tracing::error!(sink = e.sink, reason = e.reason, error = %e.message, events = b.events.len(),
                dead_letter_error = %io, "backend refused a batch and the dead-letter write failed; the batch is lost")
            }
        }
        self.events.dead_lettered(b.events.len());
    }

    /// Commits the sink and writes the checkpoint, if anything changed.
    fn checkpoint(&mut self) {
        if self.state.is_dirty() {
            match self.sink.commit() {
                Ok(cursor) => {
                    self.state.set_cursor(cursor);
                    match self.store.write(&self.state) {
                        Ok(()) => {
                            self.state.mark_clean();
                            self.events.checkpoint_flushed();
                            self.last_current = Instant::now();
                        }
                        Err(e) => {
                            self.events.checkpoint_error();
                            tracing::error!(error = %e, "checkpoint write failed; offsets not advanced, will retry");
                        }
                    }
                }
                Err(e) => {
                    self.events.checkpoint_error();
                    tracing::error!(error = %e, "sink commit failed; checkpoint not advanced, will retry");
                }
            }
        } else {
            self.last_current = Instant::now();
        }
        self.events
            .checkpoint_age(self.last_current.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for n in 0..40 {
            let d = backoff(n);
            assert!(d <= BACKOFF_MAX);
            assert!(d >= BACKOFF_MIN / 2);
        }
        assert!(backoff(20) >= BACKOFF_MAX / 2);
    }
}
