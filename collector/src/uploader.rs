//! The uploader: delivers batches to the sink, up to `concurrency` at once, and turns their
//! acknowledgements into the checkpoint, strictly in order.
//!
//! The uploader thread takes batches from the queue and hands each to one of N sender threads
//! (`voltail-send-<i>`), each driving its own instance of the sink (a *lane*); N is the sink's
//! [`lanes`](crate::config::SinkConfig::lanes). A sender `send`s its batch until acknowledged.
//! A sink with a cursor has one lane, which the uploader holds to commit anyway: there the
//! uploader makes each batch's first attempt itself, and its sender thread only retries.
//! Transient failures are retried with exponential backoff and jitter (honouring the backend's
//! `Retry-After`), for as long as it takes. A permanent failure is logged with the backend's
//! reason, counted, and the batch written to `data_dir/dead-letter/` so the pipeline moves on
//! without losing it.
//!
//! Completions arrive in any order; the [`AckWindow`] releases them in creation order, so a
//! batch's file updates and acks reach the checkpoint [`State`] only when it and every batch
//! before it are acknowledged. At most N batches are between the queue and the checkpoint
//! (sending, retrying, or done and waiting for an earlier one): with the window full the
//! uploader takes no more, the queue behind fills, the readers pause, and the files are the
//! buffer. Every `checkpoint_interval` (and at the end) the sink commits (fsync) and the offsets
//! are written together with the sink's cursor, so the checkpoint never runs ahead of durable
//! delivery. A sink with a cursor (the file sink) runs one lane, which the uploader holds while
//! it commits: the cursor and the offsets then describe the same batches.
//!
//! A batch that cannot be delivered before the shutdown deadline stops the uploader: the window
//! never moves past it, and nothing after it is acknowledged.
//!
//! The uploader does not reorder, split or merge batches, and a sender never skips one.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};

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

/// Completions in any order, released in creation order: the in-order acknowledgement window.
///
/// [`open`](AckWindow::open) numbers slots in creation order, [`complete`](AckWindow::complete)
/// fills one (in any order), and [`pop`](AckWindow::pop) hands out the oldest slot only once it
/// is filled, so nothing is released while an earlier slot is still open.
#[derive(Debug)]
pub struct AckWindow<T> {
    /// Number of the oldest open slot.
    first: u64,
    /// Open slots from `first` on; `Some` once completed.
    slots: VecDeque<Option<T>>,
}

impl<T> Default for AckWindow<T> {
    fn default() -> Self {
        AckWindow {
            first: 0,
            slots: VecDeque::new(),
        }
    }
}

impl<T> AckWindow<T> {
    /// Opens the next slot and returns its number.
    pub fn open(&mut self) -> u64 {
        self.slots.push_back(None);
        self.first + self.slots.len() as u64 - 1
    }

    /// Fills slot `slot`; false (and `value` dropped) when it is not open or already filled.
    pub fn complete(&mut self, slot: u64, value: T) -> bool {
        let Some(i) = slot.checked_sub(self.first) else {
            return false;
        };
        match self.slots.get_mut(i as usize) {
            Some(s @ None) => {
                *s = Some(value);
                true
            }
            _ => false,
        }
    }

    /// The oldest slot's value, if it is filled; its successor becomes the oldest.
    pub fn pop(&mut self) -> Option<T> {
        if !matches!(self.slots.front(), Some(Some(_))) {
            return None;
        }
        self.first += 1;
        self.slots.pop_front().flatten()
    }

    /// Open slots, filled or not.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no slot is open.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// One sink instance, shared by its sender thread and (for commits) the uploader.
type Lane = Arc<Mutex<Box<dyn Sink>>>;

fn lock(lane: &Lane) -> MutexGuard<'_, Box<dyn Sink>> {
    // A sender that panicked mid-send leaves the sink as usable as any failed send does.
    lane.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A batch for a sender, with its window slot.
struct Job {
    slot: u64,
    batch: Batch,
    /// Failed attempts so far.
    failed: u32,
    /// The failure of an attempt made before the job reached the sender (the uploader's own
    /// first attempt, on one lane): the sender waits its backoff before trying again.
    pending: Option<SinkError>,
}

/// What a sender did with a batch.
enum Done {
    /// Acknowledged, or refused for good and dead-lettered: either way it may be applied.
    Finished { slot: u64, batch: Batch },
    /// Still undelivered at the shutdown deadline.
    Abandoned,
}

/// Delivers batches and keeps the checkpoint.
pub struct Uploader {
    lanes: Vec<Lane>,
    /// Whether the (single) lane's sink keeps a cursor: commits then hold the lane.
    cursor_lane: bool,
    store: Store,
    state: State,
    rx: Receiver<Batch>,
    events: Events,
    lag: Arc<LagBoard>,
    interval: Duration,
    dead_letter: PathBuf,
    give_up: Arc<AtomicBool>,
    last_current: Instant,
    window: AckWindow<Batch>,
    /// Batches handed to senders and not finished.
    sending: usize,
    /// A sender gave a batch up at the deadline: take nothing more.
    abandoned: bool,
}

impl std::fmt::Debug for Uploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploader")
            .field("lanes", &self.lanes.len())
            .field("window", &self.window.len())
            .finish_non_exhaustive()
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
    /// An uploader over recovered sink lanes (at least one; the first one's cursor is
    /// checkpointed) and an opened checkpoint.
    #[allow(clippy::too_many_arguments)] // the pipeline's tail end, wired once by the daemon
    pub fn new(
        mut lanes: Vec<Box<dyn Sink>>,
        store: Store,
        state: State,
        rx: Receiver<Batch>,
        events: Events,
        lag: Arc<LagBoard>,
        interval: Duration,
        data_dir: PathBuf,
        give_up: Arc<AtomicBool>,
    ) -> Uploader {
        assert!(!lanes.is_empty(), "the uploader needs a sink");
        let cursor_lane = lanes[0].has_cursor();
        if cursor_lane && lanes.len() > 1 {
            // Config validation keeps these sinks at concurrency 1; stay correct regardless.
            tracing::warn!(
                sink = lanes[0].name(),
                lanes = lanes.len(),
                "a sink with a cursor runs one lane; ignoring the others"
            );
            lanes.truncate(1);
        }
        Uploader {
            lanes: lanes.into_iter().map(|s| Arc::new(Mutex::new(s))).collect(),
            cursor_lane,
            store,
            state,
            rx,
            events,
            lag,
            interval,
            dead_letter: data_dir.join("dead-letter"),
            give_up,
            last_current: Instant::now(),
            window: AckWindow::default(),
            sending: 0,
            abandoned: false,
        }
    }

    /// Runs until the queue closes and everything taken is finished (or the deadline passes),
    /// then writes a last checkpoint.
    pub fn run(mut self) -> UploadExit {
        let n = self.lanes.len();
        let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(n);
        // Unbounded so a sender never blocks posting while it holds its lane (the uploader may
        // be waiting for that lane to commit); at most `n` completions are ever queued.
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
        let deliverer = |lane: &Lane| Deliverer {
            lane: Arc::clone(lane),
            events: self.events.clone(),
            dead_letter: self.dead_letter.clone(),
            give_up: Arc::clone(&self.give_up),
        };
        // A sink with a cursor (one lane, held by the uploader to commit, so nothing overlaps
        // a send anyway): the uploader makes each batch's first attempt itself and hands the
        // batch to the sender thread only to retry it. On W3 with the probe (100 batches a
        // second) the two hand-offs per batch were a fifth of the collector's CPU. Network
        // sinks keep their senders: a slow request must not hold up the checkpoint.
        let inline = self.cursor_lane.then(|| deliverer(&self.lanes[0]));
        let mut senders = Vec::with_capacity(n);
        for (i, lane) in self.lanes.iter().enumerate() {
            let s = SendLoop {
                d: deliverer(lane),
                jobs: job_rx.clone(),
                done: done_tx.clone(),
            };
            match std::thread::Builder::new()
                .name(format!("voltail-send-{i}"))
                .spawn(move || s.run())
            {
                Ok(h) => senders.push(h),
                Err(e) => {
                    tracing::warn!(lane = i, error = %e, "cannot start a sender thread; running with fewer")
                }
            }
        }
        drop((job_rx, done_tx));
        if senders.is_empty() {
            tracing::error!("no sender thread could start; nothing is delivered");
            return UploadExit::Abandoned;
        }
        let never = crossbeam_channel::never::<Batch>();
        let mut closed = false;
        let mut next = Instant::now() + self.interval;
        loop {
            if (closed || self.abandoned) && self.sending == 0 {
                break;
            }
            let room = !closed && !self.abandoned && self.window.len() < n;
            let input = if room { &self.rx } else { &never };
            let wait = next.saturating_duration_since(Instant::now());
            crossbeam_channel::select! {
                recv(done_rx) -> d => match d {
                    Ok(d) => self.finished(d),
                    Err(_) => {
                        // Every sender is gone (they only stop when the jobs channel closes).
                        tracing::error!("sender threads ended early; stopping the uploader");
                        self.abandoned = true;
                        self.sending = 0;
                    }
                },
                recv(input) -> b => match b {
                    Ok(batch) => {
                        let job = Job {
                            slot: self.window.open(),
                            batch,
                            failed: 0,
                            pending: None,
                        };
                        self.sending += 1;
                        let job = match &inline {
                            Some(d) => match d.attempt(&mut lock(&d.lane), job) {
                                Ok(done) => {
                                    self.finished(done);
                                    None
                                }
                                Err(failed) => {
                                    let (job, e) = *failed;
                                    Some(Job {
                                        pending: Some(e),
                                        ..job
                                    })
                                }
                            },
                            None => Some(job),
                        };
                        if let Some(job) = job {
                            if job_tx.send(job).is_err() {
                                self.abandoned = true;
                            }
                        }
                    }
                    Err(_) => closed = true,
                },
                default(wait) => {}
            }
            self.events.sink_in_flight(self.sending);
            if Instant::now() >= next {
                self.checkpoint(&done_rx);
                next = Instant::now() + self.interval;
            }
        }
        drop(job_tx);
        for h in senders {
            let _ = h.join();
        }
        self.events.sink_in_flight(0);
        self.checkpoint(&done_rx);
        if self.abandoned {
            UploadExit::Abandoned
        } else {
            UploadExit::Drained
        }
    }

    /// Takes a sender's completion and applies every batch it releases.
    fn finished(&mut self, d: Done) {
        self.sending = self.sending.saturating_sub(1);
        match d {
            Done::Finished { slot, batch } => {
                self.window.complete(slot, batch);
                while let Some(b) = self.window.pop() {
                    self.apply(&b);
                }
            }
            // Its slot stays open: nothing after it is applied.
            Done::Abandoned => self.abandoned = true,
        }
    }

    /// Applies a finished batch to the checkpoint state (in creation order).
    fn apply(&mut self, b: &Batch) {
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
    }

    /// Commits the sink and writes the checkpoint, if anything changed.
    fn checkpoint(&mut self, done: &Receiver<Done>) {
        // A sink with a cursor: hold its lane, so no send is in progress and every finished one
        // has posted its completion (senders post while holding the lane); apply them all, and
        // the cursor then covers exactly the applied batches.
        let lane = Arc::clone(&self.lanes[0]);
        let mut held = self.cursor_lane.then(|| lock(&lane));
        while let Ok(d) = done.try_recv() {
            self.finished(d);
        }
        if !self.state.is_dirty() {
            self.last_current = Instant::now();
            self.events
                .checkpoint_age(self.last_current.elapsed().as_secs_f64());
            return;
        }
        // Sinks without a cursor have nothing to make durable: their acknowledgement is final.
        let committed = match held.as_mut() {
            Some(sink) => sink.commit(),
            None => Ok(Vec::new()),
        };
        drop(held);
        match committed {
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
        self.events
            .checkpoint_age(self.last_current.elapsed().as_secs_f64());
    }
}

/// Delivers batches through one lane: the sender threads' and the uploader's common part.
struct Deliverer {
    lane: Lane,
    events: Events,
    dead_letter: PathBuf,
    give_up: Arc<AtomicBool>,
}

impl Deliverer {
    /// One attempt: the batch's completion (acknowledged, or refused for good and
    /// dead-lettered), or the job back with a transient error.
    fn attempt(&self, sink: &mut Box<dyn Sink>, job: Job) -> Result<Done, Box<(Job, SinkError)>> {
        let e = match sink.send(&job.batch) {
            Ok(()) => {
                let b = &job.batch;
                self.events.sink_delivered(b.raw_bytes, b.payload.len());
                if job.failed > 0 {
                    tracing::info!(
                        sink = sink.name(),
                        batch = b.seq,
                        attempts = job.failed + 1,
                        "delivered after retries"
                    );
                }
                return Ok(Done::Finished {
                    slot: job.slot,
                    batch: job.batch,
                });
            }
            Err(e) => e,
        };
        if e.kind != SinkErrorKind::Transient {
            self.events.sink_error(e.sink, e.reason, false);
            write_dead_letter(&self.dead_letter, &job.batch, &e, &self.events);
            return Ok(Done::Finished {
                slot: job.slot,
                batch: job.batch,
            });
        }
        Err(Box::new((job, e)))
    }

    /// Counts and logs transient failure `e` of `job`, then waits its backoff; false when the
    /// shutdown deadline passed meanwhile.
    fn wait_to_retry(&self, job: &mut Job, e: &SinkError) -> bool {
        let b = &job.batch;
        let attempt = job.failed;
        self.events.sink_error(e.sink, e.reason, true);
        if attempt < 3 || attempt % 20 == 0 {
            tracing::warn!(sink = e.sink, reason = e.reason, batch = b.seq, attempt, error = %e.message,
                "delivery failed; retrying (reading pauses while the queue is full)");
        }
        let until = Instant::now() + e.retry_after.unwrap_or_else(|| backoff(attempt));
        while Instant::now() < until {
            if self.give_up.load(Ordering::Relaxed) {
                tracing::error!(sink = e.sink, batch = b.seq,
                    "shutdown deadline passed with a batch undelivered; it will be read again after restart");
                return false;
            }
            std::thread::sleep(
                until
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50)),
            );
        }
        job.failed = job.failed.saturating_add(1);
        true
    }
}

/// A sender thread: delivers the batches it takes from the jobs queue through its lane.
struct SendLoop {
    d: Deliverer,
    jobs: Receiver<Job>,
    done: Sender<Done>,
}

impl SendLoop {
    fn run(self) {
        while let Ok(job) = self.jobs.recv() {
            self.deliver(job);
        }
    }

    /// Sends one batch until it is acknowledged, refused for good, or the deadline passes. A
    /// job whose first attempt failed already (the uploader's inline one) carries the error in
    /// `pending` and waits before its next.
    fn deliver(&self, mut job: Job) {
        loop {
            if let Some(e) = job.pending.take() {
                if !self.d.wait_to_retry(&mut job, &e) {
                    let _ = self.done.send(Done::Abandoned);
                    return;
                }
            }
            // Held for the attempt only: the wait above runs with the lane free.
            let mut sink = lock(&self.d.lane);
            match self.d.attempt(&mut sink, job) {
                Ok(done) => {
                    // Posted while the lane is held: see `Uploader::checkpoint`.
                    let _ = self.done.send(done);
                    return;
                }
                Err(failed) => {
                    let (j, e) = *failed;
                    job = Job {
                        pending: Some(e),
                        ..j
                    };
                }
            }
        }
    }
}

/// Writes a refused batch and the reason to the dead-letter directory.
fn write_dead_letter(dir: &Path, b: &Batch, e: &SinkError, events: &Events) {
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
    let data = dir.join(format!("{name}.{ext}"));
    let why = dir.join(format!("{name}.error"));
    let res = std::fs::create_dir_all(dir)
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
    events.dead_lettered(b.events.len());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Ack;
    use crate::checkpoint::FileUpdate;
    use crate::identity::FileId;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn backoff_grows_and_is_capped() {
        for n in 0..40 {
            let d = backoff(n);
            assert!(d <= BACKOFF_MAX);
            assert!(d >= BACKOFF_MIN / 2);
        }
        assert!(backoff(20) >= BACKOFF_MAX / 2);
    }

    /// Out-of-order completions are released in order; an open slot in the middle (a batch
    /// being retried) holds back everything after it until it completes.
    #[test]
    fn ack_window_releases_in_order_and_waits_for_a_retried_middle() {
        let mut w = AckWindow::default();
        let slots: Vec<u64> = (0..5).map(|_| w.open()).collect();
        assert_eq!(slots, [0, 1, 2, 3, 4]);
        // 3 and 1 finish first; slot 0 still open: nothing is released.
        assert!(w.complete(3, "c3"));
        assert!(w.complete(1, "c1"));
        assert_eq!(w.pop(), None);
        // 0 finishes: 0 and 1 go; 2 failed and is being retried: 3 waits behind it.
        assert!(w.complete(0, "c0"));
        assert_eq!(w.pop(), Some("c0"));
        assert_eq!(w.pop(), Some("c1"));
        assert_eq!(w.pop(), None);
        assert!(w.complete(4, "c4"));
        assert_eq!(w.pop(), None);
        assert_eq!(w.len(), 3, "2 (retrying), 3 and 4 (done) are held");
        // New batches keep their numbers while older ones are held.
        assert_eq!(w.open(), 5);
        // The retry of 2 succeeds: 2, 3, 4 go, in order; 5 is still open.
        assert!(w.complete(2, "c2 after retry"));
        assert_eq!(w.pop(), Some("c2 after retry"));
        assert_eq!(w.pop(), Some("c3"));
        assert_eq!(w.pop(), Some("c4"));
        assert_eq!(w.pop(), None);
        // Completing a slot twice, or one never opened or already released, is refused.
        assert!(w.complete(5, "c5"));
        assert!(!w.complete(5, "again"));
        assert!(!w.complete(0, "released"));
        assert!(!w.complete(9, "never opened"));
        assert_eq!(w.pop(), Some("c5"));
        assert!(w.is_empty());
    }

    /// A network-like sink: each send takes a scripted time; batch 2's first attempt fails
    /// transiently; batch 1 waits for a gate the test opens.
    struct Scripted {
        active: Arc<AtomicUsize>,
        peak: Arc<AtomicUsize>,
        attempts: Arc<Mutex<Vec<u64>>>,
        gate: Arc<AtomicBool>,
    }

    impl Sink for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }
        fn send(&mut self, b: &Batch) -> Result<(), SinkError> {
            let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            let first = {
                let mut a = self.attempts.lock().expect("lock");
                let first = !a.contains(&b.seq);
                a.push(b.seq);
                first
            };
            // Later batches finish sooner: completions come out of order.
            std::thread::sleep(Duration::from_millis(40 - 4 * (b.seq % 8)));
            while b.seq == 1 && !self.gate.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.active.fetch_sub(1, Ordering::SeqCst);
            if b.seq == 2 && first {
                return Err(SinkError {
                    sink: "scripted",
                    kind: SinkErrorKind::Transient,
                    reason: "http_5xx",
                    message: "HTTP 503: busy".into(),
                    retry_after: Some(Duration::from_millis(20)),
                });
            }
            Ok(())
        }
    }

    fn batch(seq: u64) -> Batch {
        let track = FileUpdate::Track {
            key: 1,
            id: FileId {
                dev: 1,
                ino: 2,
                fp: 3,
                fp_len: 4,
            },
            path: "/x.log".into(),
            source: "app".into(),
            offset: 0,
        };
        Batch {
            seq,
            payload: Vec::new(),
            compression: Compression::None,
            raw_bytes: 0,
            events: Vec::new(),
            files: Vec::new(),
            acks: vec![Ack {
                key: 1,
                offset: (seq + 1) * 100,
            }],
            updates: if seq == 0 { vec![track] } else { Vec::new() },
            releases: Vec::new(),
            opened: Instant::now(),
        }
    }

    /// An uploader over `lanes` with a fresh state, checkpointing every `interval`, fed
    /// through a queue of two.
    fn uploader(
        lanes: Vec<Box<dyn Sink>>,
        store: Store,
        dir: &Path,
        interval: Duration,
    ) -> (Sender<Batch>, Uploader) {
        let (tx, rx) = crossbeam_channel::bounded(2);
        let up = Uploader::new(
            lanes,
            store,
            State::default(),
            rx,
            Events::new(),
            Arc::default(),
            interval,
            dir.to_path_buf(),
            Arc::default(),
        );
        (tx, up)
    }

    fn checkpointed(dir: &Path) -> u64 {
        let loaded = crate::checkpoint::read_only(dir).expect("read checkpoint");
        loaded.entries.first().map(|e| e.offset).unwrap_or(0)
    }

    /// Four lanes: four sends at once, completions out of order, a transient failure in the
    /// middle retried, and the checkpoint on disk never past the oldest unacknowledged batch.
    #[test]
    fn concurrent_sends_checkpoint_in_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let (store, _) = Store::open(dir.path()).expect("store");
        let (active, peak) = (Arc::default(), Arc::new(AtomicUsize::new(0)));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(AtomicBool::new(false));
        let lanes: Vec<Box<dyn Sink>> = (0..4)
            .map(|_| {
                Box::new(Scripted {
                    active: Arc::clone(&active),
                    peak: Arc::clone(&peak),
                    attempts: Arc::clone(&attempts),
                    gate: Arc::clone(&gate),
                }) as Box<dyn Sink>
            })
            .collect();
        let (tx, up) = uploader(lanes, store, dir.path(), Duration::from_millis(20));
        let h = std::thread::spawn(move || up.run());
        let feeder = std::thread::spawn(move || {
            for seq in 0..24 {
                tx.send(batch(seq)).expect("send");
            }
        });
        // Batch 1 is held at the gate: batches 2.. finish, but only batch 0 may be checkpointed.
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(
            checkpointed(dir.path()),
            100,
            "only batch 0 is acknowledged in order"
        );
        assert_eq!(peak.load(Ordering::SeqCst), 4, "four sends at once");
        gate.store(true, Ordering::SeqCst);
        feeder.join().expect("feeder");
        assert_eq!(h.join().expect("uploader"), UploadExit::Drained);
        assert_eq!(checkpointed(dir.path()), 2400, "every batch acknowledged");
        assert_eq!(peak.load(Ordering::SeqCst), 4, "never more than the lanes");
        let a = attempts.lock().expect("lock");
        assert_eq!(
            a.iter().filter(|&&s| s == 2).count(),
            2,
            "batch 2 retried once"
        );
        assert_eq!(a.len(), 25);
    }

    /// A sink with a cursor: batch 2's first attempt fails transiently, batch 5 is refused for
    /// good. Records which thread made each attempt.
    /// Each attempt: the batch and the name of the thread that made it.
    type Attempts = Arc<Mutex<Vec<(u64, Option<String>)>>>;

    struct Cursored {
        attempts: Attempts,
        commits: Arc<AtomicUsize>,
    }

    impl Sink for Cursored {
        fn name(&self) -> &'static str {
            "cursored"
        }
        fn send(&mut self, b: &Batch) -> Result<(), SinkError> {
            let thread = std::thread::current().name().map(String::from);
            let first = {
                let mut a = self.attempts.lock().expect("lock");
                let first = !a.iter().any(|(s, _)| *s == b.seq);
                a.push((b.seq, thread));
                first
            };
            let fail = |kind, reason| SinkError {
                sink: "cursored",
                kind,
                reason,
                message: "no".into(),
                retry_after: Some(Duration::from_millis(10)),
            };
            match b.seq {
                2 if first => Err(fail(SinkErrorKind::Transient, "io")),
                5 => Err(fail(SinkErrorKind::Permanent, "format")),
                _ => Ok(()),
            }
        }
        fn has_cursor(&self) -> bool {
            true
        }
        fn commit(&mut self) -> Result<Vec<u8>, SinkError> {
            self.commits.fetch_add(1, Ordering::SeqCst);
            Ok(vec![1])
        }
    }

    /// With a cursor sink the uploader makes every first attempt itself; a transient failure
    /// is retried by the sender thread, a permanent one dead-lettered, and every batch is
    /// checkpointed in order.
    #[test]
    fn a_cursor_sink_is_sent_to_by_the_uploader_and_retried_by_its_sender() {
        let dir = tempfile::tempdir().expect("tmp");
        let (store, _) = Store::open(dir.path()).expect("store");
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let commits = Arc::new(AtomicUsize::new(0));
        let lanes: Vec<Box<dyn Sink>> = vec![Box::new(Cursored {
            attempts: Arc::clone(&attempts),
            commits: Arc::clone(&commits),
        })];
        let (tx, up) = uploader(lanes, store, dir.path(), Duration::from_millis(5));
        let h = std::thread::Builder::new()
            .name("uploader-under-test".into())
            .spawn(move || up.run())
            .expect("spawn");
        for seq in 0..12 {
            tx.send(batch(seq)).expect("send");
        }
        drop(tx);
        assert_eq!(h.join().expect("uploader"), UploadExit::Drained);
        assert_eq!(checkpointed(dir.path()), 1200, "every batch acknowledged");
        assert!(commits.load(Ordering::SeqCst) > 0);
        let a = attempts.lock().expect("lock");
        assert_eq!(a.len(), 13, "{a:?}");
        let by = |seq: u64| -> Vec<Option<&str>> {
            a.iter()
                .filter(|(s, _)| *s == seq)
                .map(|(_, t)| t.as_deref())
                .collect()
        };
        assert_eq!(
            by(2),
            [Some("uploader-under-test"), Some("voltail-send-0")],
            "first attempt inline, the retry on the sender"
        );
        for seq in [0, 1, 3, 4, 5, 11] {
            assert_eq!(by(seq), [Some("uploader-under-test")], "batch {seq}");
        }
        let dead = std::fs::read_dir(dir.path().join("dead-letter"))
            .expect("dead-letter directory")
            .count();
        assert_eq!(dead, 2, "batch 5 and its reason");
    }
}
