//! Tailing: the reader loop that polls tracked files, reads what they gained, follows
//! rotation, truncation and deletion, and hands framed events to the batch builder.
//!
//! The [`Tailer`] owns every tracked file ([`Tracked`]: descriptor, identity, read offset,
//! framer, poll schedule). Each poll round takes the files that are due and runs their calls
//! through a [`backend::ReadBackend`] in two batched phases: `statx` of each descriptor and of
//! each path, then reads of the files that grew. Decisions made on the results:
//! - size below the read offset: the file was truncated (copytruncate): start again at 0;
//! - the path names another inode, is gone, or the open file has no links: the file was
//!   rotated away or deleted: keep reading it through the descriptor to its end, release it
//!   after `rotate_wait` of quiet, and look at the path at once for its successor;
//! - a file that grew is polled every `poll_interval`; an idle one backs off, doubling, up to
//!   `max_poll_interval` (or `probe_poll_interval` while the eBPF probe watches local writers),
//!   and returns to the fast rate on its first new byte or on a probe [`Hint`].
//!
//! At start, discovered files are matched to checkpoint entries by inode and fingerprint (the
//! device is only a tie-breaker, see `identity`), and reading resumes at the acknowledged
//! offset. Entries whose path now names another file are looked for in their directory under
//! a rotated name and finished. Every change to the set of tracked files travels in the batch
//! stream as a [`FileUpdate`], so the checkpoint follows delivery, never reading.
//!
//! Filesystem errors (EIO, ESTALE, a directory that vanished) are not the end of a file: a
//! failed stat or read is counted, logged (the first few, then every 20th) and retried with
//! the idle backoff; a descriptor gone stale is reopened by its path when the path still names
//! the same file; a file whose path names it again is followed again; and a released file
//! that comes back to a watched path resumes where it was released, by inode and fingerprint,
//! as after a restart. A file is given up only when its path says it is gone.
//!
//! This module does not talk to sinks and does not write the checkpoint.

pub mod backend;
pub mod hints;
pub mod pread;
pub mod select;
pub mod uring;

#[cfg(test)]
mod conformance;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::ffi::{CStr, CString};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{SendTimeoutError, Sender};

use self::hints::{HintReceiver, Mute};
use encoding_rs::Encoding;

use self::backend::{Errno, ReadBackend, ReadOp, Stat, StatOp};
use crate::batch::{Batch, BatchBuilder, FileKey, FileMeta, Timestamp};
use crate::checkpoint::{Entry, FileUpdate};
use crate::config::{SourceConfig, StartAt};
use crate::discovery::{old_enough, wall_ns, Candidate, Discovery};
use crate::framing::{Framed, Framer};
use crate::identity::{FileId, Match, FINGERPRINT_BYTES};
use crate::lag::LagBoard;
use crate::metrics::Events;
use crate::tags::{PathTagger, Writer};
use crate::FastMap;

/// A hint that a file may have changed, from outside the poll loop (the eBPF probe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint {
    /// A process on this node wrote to the file `dev`/`ino` (`dev` as `st_dev` shows it).
    Write {
        /// `st_dev` of the file.
        dev: u64,
        /// Inode.
        ino: u64,
        /// Inode of the directory the file was opened in, on `dev` (0: unknown).
        dir: u64,
        /// Who wrote, when writer tags are on and its cgroup resolved: the file's events get
        /// its tags from the next read on.
        writer: Option<Arc<Writer>>,
    },
}

/// Files whose stats go to the backend in one call.
const STAT_CHUNK: usize = 4096;
/// Files read in one call at most.
const READ_CHUNK: usize = 1024;
/// Bytes read from one file in one round at most.
const READ_BUF: usize = 256 * 1024;
/// Bytes read in one call at most (the arena the read buffers are carved from).
const READ_ARENA: usize = 8 << 20;
/// Bytes a hinted read asks for without a stat (see [`Tailer::hinted_read`]): a file that
/// fills it is read on in the next round, stated as usual.
const HINT_READ: usize = 4 * 1024;
/// Shortest sleep between rounds, so that due files gather into batched rounds.
const MIN_TICK: Duration = Duration::from_millis(20);
/// Writers of files not tracked yet remembered, so a new file's first events carry its writer.
const PENDING_WRITERS: usize = 4096;
/// Untracked inodes whose writes make discovery look soon, at most: hinted since the last
/// pass (`asked`), or found unmatched by one (`unmatched`).
const UNMATCHED_KEPT: usize = 16_384;
/// How long a write to an inode that a discovery pass did not turn into a tracked file stops
/// making discovery look soon. Such files are common (a pod's `debug.log` the globs leave out,
/// another shard's files, the checkpoint of another instance on the same device), and without
/// this each of their writes would cost a discovery pass every 200 ms. A file that comes to
/// match later (renamed into a matching name) is found by the regular passes meanwhile.
const UNMATCHED_FOR: Duration = Duration::from_secs(60);
/// How soon a discovery pass follows a write the probe saw to an unknown file, at first and
/// at most: each pass so triggered that tracks none of those files doubles the delay (files
/// outside the watched roots on the same device, a build writing new files, make a pass each
/// otherwise), and one that does resets it.
const SOON: Duration = Duration::from_millis(200);
const SOON_MAX: Duration = Duration::from_secs(5);
/// Released files remembered, so that one coming back (its directory vanished and returned)
/// resumes where it was released instead of being read again.
const RELEASED_KEPT: usize = 4096;

/// A source with its compiled parts.
#[derive(Debug)]
pub struct SourceRt {
    name: Arc<str>,
    cfg: SourceConfig,
    tagger: PathTagger,
    multiline: Option<Arc<regex::bytes::Regex>>,
    encoding: Option<&'static Encoding>,
}

impl SourceRt {
    /// Compiles a validated source.
    pub fn new(cfg: &SourceConfig) -> Result<SourceRt, regex::Error> {
        let tagger = PathTagger::new(cfg.path_tags.as_ref().map(|s| s.get_ref().as_str()))?;
        let multiline = match &cfg.multiline {
            Some(m) => Some(Arc::new(regex::bytes::Regex::new(
                m.start_pattern.get_ref(),
            )?)),
            None => None,
        };
        let encoding = cfg
            .encoding
            .as_ref()
            .and_then(|e| Encoding::for_label(e.get_ref().as_bytes()))
            .filter(|e| *e != encoding_rs::UTF_8);
        Ok(SourceRt {
            name: Arc::from(cfg.name.get_ref().as_str()),
            cfg: cfg.clone(),
            tagger,
            multiline,
            encoding,
        })
    }
}

/// One tracked file.
#[derive(Debug)]
struct Tracked {
    key: FileKey,
    source: usize,
    path: PathBuf,
    cpath: CString,
    /// When what `path` names is to be checked next even if the file did not change.
    next_path_check: Instant,
    /// The file's size when its path was last checked.
    path_checked_size: u64,
    /// Its directory, for the stat that tells whether anything in it was renamed.
    cdir: CString,
    /// The directory's stamp from just before the path last named this file (`None`: unknown
    /// or not to be trusted); while the directory shows the same stamp, the path still names it.
    dir_stamp: Option<DirStamp>,
    /// When a stat of the path last showed that it names this file.
    path_verified: Instant,
    /// A discovery pass found the entries of the file's directory changed since its path was
    /// last checked (only directories discovery lists), or the probe saw a file nobody
    /// tracks written there.
    dir_changed: bool,
    /// Inode number of its directory when tracked, with the probe on (0 otherwise; then as
    /// the probe's events for the file report it): a write the probe reports there to an
    /// unknown file (a rotation's successor) has this directory's followed paths checked at
    /// once, without a discovery pass.
    dir_ino: u64,
    /// The size last put on the lag board.
    lag_size: u64,
    file: File,
    dev: u64,
    ino: u64,
    id: FileId,
    /// The first bytes, kept while the fingerprint is still growing.
    prefix: Vec<u8>,
    meta: Arc<FileMeta>,
    read_off: u64,
    acked_sent: u64,
    size: u64,
    mtime_ns: i64,
    framer: Framer,
    /// Rotated away, deleted, or no longer named by a glob: finish and release.
    orphan: bool,
    interval: Duration,
    next_due: Instant,
    /// The poll time `after_read` last put on the schedule: while `next_due` is that time
    /// (and so still ahead), its entry is there and another would only be skipped as stale.
    scheduled: Option<Instant>,
    last_change: Instant,
    /// Stats or reads failed in a row (EIO, ESTALE, ...); 0 while healthy.
    errors: u32,
    /// Read this round without a stat ([`Tailer::hinted_read`]): [`HINT_READ`] bytes are asked.
    unstated: bool,
    /// A hinted read could not tell the whole story (it found nothing, filled its buffer, or
    /// found the first bytes changed): the file stays due until a round states it.
    restat: bool,
    /// The last writer the probe named (writer tags on), rendered into `meta`.
    writer: Option<Arc<Writer>>,
}

/// How the tailer runs.
#[derive(Debug, Clone)]
pub struct TailerOptions {
    /// No checkpoint existed: `start_at = "end"` applies to the files found now.
    pub first_start: bool,
    /// The eBPF probe is watching local writers: idle files may back off further.
    pub probe_poll_interval: Option<Duration>,
    /// This replica's share of the pod directories.
    pub shard: Option<crate::config::Shard>,
}

/// The reader loop.
pub struct Tailer {
    sources: Vec<SourceRt>,
    discovery: Discovery,
    backend: Box<dyn ReadBackend>,
    builder: BatchBuilder,
    out: Sender<Batch>,
    hints: HintReceiver,
    /// Hints taken from `hints`, kept for its allocation.
    hint_buf: Vec<Hint>,
    /// Origin of the poll grid ([`on_grid`]).
    epoch: Instant,
    events: Events,
    lag: Arc<LagBoard>,
    opts: TailerOptions,
    shard: Option<crate::config::Shard>,
    files: FastMap<FileKey, Tracked>,
    /// When each file must be looked at next: an entry at every `next_due` ever set, plus
    /// one at the time a partial line is to be flushed. Entries whose file is gone or whose
    /// time passed without the file being due are stale and skipped, so a round costs
    /// O(due files x log files), not a scan of every tracked file (10,000 idle files).
    schedule: BinaryHeap<Reverse<(Instant, FileKey)>>,
    /// Files the probe made due now, in the order hinted: due at once, so they skip the heap
    /// (ten thousand hints a second would otherwise each be a push and a pop on it).
    hinted: Vec<FileKey>,
    by_path: Followed,
    by_ino: FastMap<(u64, u64), FileKey>,
    /// Directory stamps changed this recently are not trusted ([`RACY`]; tests lower it).
    racy: Duration,
    /// Each stated directory's stamp and since when (our clock) it has shown it: a stamp seen
    /// unchanged for [`RACY`] is trusted even when its times lie ahead of our wall clock (a
    /// file server whose clock runs ahead), as discovery trusts its listings.
    dir_seen: HashMap<(u64, u64), DirSeen>,
    /// Checkpoint entries (with their keys) not matched to a file yet, by inode.
    restore: HashMap<u64, Vec<(FileKey, Entry)>>,
    next_key: FileKey,
    /// Read buffers of a chunk, carved per file from one arena.
    arena: Vec<u8>,
    prefix_bufs: Vec<Vec<u8>>,
    discovered_once: bool,
    next_discovery: Instant,
    next_lag: Instant,
    failed_opens: HashMap<PathBuf, Instant>,
    /// Files released lately, by inode: identity and the offset they were finished at.
    released: HashMap<u64, (FileId, u64)>,
    released_order: std::collections::VecDeque<u64>,
    /// Writers the probe named for files not tracked yet, by (dev, ino).
    pending_writers: HashMap<(u64, u64), Arc<Writer>>,
    /// Untracked inodes the probe saw written since the last discovery pass.
    asked: std::collections::HashSet<(u64, u64)>,
    /// How soon such a write makes discovery look ([`SOON`] to [`SOON_MAX`]).
    soon: Duration,
    /// Untracked inodes the probe saw written in a directory of tracked files, whose paths
    /// the next round checks: those it does not find go to `asked`.
    directed: Vec<(u64, u64)>,
    /// Directories' inode numbers stated during a discovery pass (for [`Tracked::dir_ino`]).
    dir_inos: HashMap<PathBuf, u64>,
    /// Untracked inodes a discovery pass looked for and did not find, with when their writes
    /// may make discovery look soon again ([`UNMATCHED_FOR`]).
    unmatched: HashMap<(u64, u64), Instant>,
    scratch: String,
}

impl std::fmt::Debug for Tailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tailer")
            .field("files", &self.files.len())
            .field("backend", &self.backend.name())
            .finish()
    }
}

/// Everything the tailer is built from.
#[derive(Debug)]
pub struct TailerParts {
    /// Compiled sources.
    pub sources: Vec<SourceRt>,
    /// Discovery over the sources' globs.
    pub discovery: Discovery,
    /// The read backend.
    pub backend: Box<dyn ReadBackend>,
    /// Batch builder using the sink's encoder.
    pub builder: BatchBuilder,
    /// Where closed batches go.
    pub out: Sender<Batch>,
    /// Probe hints.
    pub hints: HintReceiver,
    /// Metrics.
    pub events: Events,
    /// Lag bookkeeping shared with the uploader.
    pub lag: Arc<LagBoard>,
    /// Checkpoint entries to resume from, under the keys the uploader's state holds them by.
    pub restore: Vec<(FileKey, Entry)>,
    /// Options.
    pub opts: TailerOptions,
}

/// How a `run` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `stop` was set and everything framed was handed on.
    Stopped,
    /// The downstream queue went away or `give_up` was set while handing on.
    Abandoned,
}

impl Tailer {
    /// Builds a tailer.
    pub fn new(p: TailerParts) -> Tailer {
        let mut restore: HashMap<u64, Vec<(FileKey, Entry)>> = HashMap::new();
        let next_key = p.restore.iter().map(|(k, _)| k + 1).max().unwrap_or(1);
        for (k, e) in p.restore {
            restore.entry(e.id.ino).or_default().push((k, e));
        }
        let now = Instant::now();
        Tailer {
            sources: p.sources,
            discovery: p.discovery,
            backend: p.backend,
            builder: p.builder,
            out: p.out,
            hints: p.hints,
            hint_buf: Vec::new(),
            epoch: now,
            events: p.events,
            lag: p.lag,
            shard: p.opts.shard,
            opts: p.opts,
            files: FastMap::default(),
            schedule: BinaryHeap::new(),
            hinted: Vec::new(),
            by_path: Followed::default(),
            racy: RACY,
            dir_seen: HashMap::new(),
            by_ino: FastMap::default(),
            restore,
            next_key,
            arena: Vec::new(),
            prefix_bufs: Vec::new(),
            discovered_once: false,
            next_discovery: now,
            next_lag: now,
            failed_opens: HashMap::new(),
            released: HashMap::new(),
            released_order: std::collections::VecDeque::new(),
            pending_writers: HashMap::new(),
            asked: std::collections::HashSet::new(),
            soon: SOON,
            directed: Vec::new(),
            dir_inos: HashMap::new(),
            unmatched: HashMap::new(),
            scratch: String::new(),
        }
    }

    /// Runs until `stop` is set, then hands on the open batch. `give_up` aborts a blocked
    /// hand-on (the shutdown deadline passed).
    pub fn run(&mut self, stop: &AtomicBool, give_up: &AtomicBool) -> Exit {
        self.events.reader_backend(self.backend.name());
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= self.next_discovery {
                self.discover(now);
            }
            let more = self.round(now);
            while self.builder.is_full() || self.builder.is_due(Instant::now()) {
                let Some(b) = self.builder.take() else { break };
                if !self.send(b, give_up) {
                    return Exit::Abandoned;
                }
            }
            if now >= self.next_lag {
                self.publish_lag();
                self.builder.trim_spares(now);
                self.next_lag = now + Duration::from_secs(1);
            }
            if more {
                self.drain_hints(now);
                continue;
            }
            let wake = self.next_wake();
            let now = Instant::now();
            let mut sleep = wake.saturating_duration_since(now).max(MIN_TICK);
            // Rounds gather for at least MIN_TICK; a batch lingering less ships on time.
            if let Some(d) = self.builder.due_at() {
                sleep = sleep.min(d.saturating_duration_since(now));
            }
            // Without a probe nothing posts: this is a plain sleep.
            let mut got = std::mem::take(&mut self.hint_buf);
            self.hints.wait(sleep, &mut got);
            self.apply_hints(&mut got, Instant::now());
            self.hint_buf = got;
        }
        while let Some(b) = self.builder.take() {
            if !self.send(b, give_up) {
                return Exit::Abandoned;
            }
        }
        Exit::Stopped
    }

    fn next_wake(&self) -> Instant {
        let mut wake = self.next_discovery.min(self.next_lag);
        if let Some(d) = self.builder.due_at() {
            wake = wake.min(d);
        }
        if let Some(Reverse((t, _))) = self.schedule.peek() {
            wake = wake.min(*t);
        }
        if !self.hinted.is_empty() {
            wake = Instant::now().min(wake);
        }
        wake
    }

    /// When file `k` wants attention: its next poll, and the flush of a waiting partial line.
    fn wake_times(&self, k: FileKey) -> Option<(Instant, Option<Instant>)> {
        self.files.get(&k).map(|f| {
            let flush = (f.framer.pending() > 0)
                .then(|| f.last_change + self.sources[f.source].cfg.flush_partial_after.0);
            (f.next_due, flush)
        })
    }

    /// Whether file `k` has something to do at `now`.
    fn is_due(&self, k: FileKey, now: Instant) -> bool {
        self.wake_times(k)
            .is_some_and(|(poll, flush)| poll <= now || flush.is_some_and(|t| t <= now))
    }

    /// Takes the files due at `now` off the schedule, each once, and those of them the probe
    /// hinted (sorted).
    fn take_due(&mut self, now: Instant) -> (Vec<FileKey>, Vec<FileKey>) {
        let mut hinted = std::mem::take(&mut self.hinted);
        hinted.retain(|&k| self.is_due(k, now));
        hinted.sort_unstable();
        hinted.dedup();
        let mut due = hinted.clone();
        while let Some(&Reverse((t, k))) = self.schedule.peek() {
            if t > now {
                break;
            }
            self.pop_schedule(t, k);
            if self.is_due(k, now) {
                due.push(k);
            }
        }
        due.sort_unstable();
        due.dedup();
        (due, hinted)
    }

    /// Drops stale entries from the top of the schedule so the next wake-up is a real one.
    fn prune_schedule(&mut self) {
        while let Some(&Reverse((t, k))) = self.schedule.peek() {
            let live = self
                .wake_times(k)
                .is_some_and(|(poll, flush)| poll == t || flush == Some(t));
            if live {
                break;
            }
            self.pop_schedule(t, k);
        }
    }

    /// Pops the schedule's top entry, `(t, k)`; the file's `scheduled` no longer holds.
    fn pop_schedule(&mut self, t: Instant, k: FileKey) {
        self.schedule.pop();
        if let Some(f) = self.files.get_mut(&k) {
            if f.scheduled == Some(t) {
                f.scheduled = None;
            }
        }
    }

    fn send(&mut self, b: Batch, give_up: &AtomicBool) -> bool {
        let mut b = b;
        loop {
            match self.out.send_timeout(b, Duration::from_millis(100)) {
                Ok(()) => return true,
                Err(SendTimeoutError::Timeout(back)) => {
                    // Downstream is full: the reader pauses here, the files are the buffer.
                    if give_up.load(Ordering::Relaxed) {
                        return false;
                    }
                    b = back;
                    let now = Instant::now();
                    if now >= self.next_lag {
                        self.publish_lag_waiting();
                        self.next_lag = now + Duration::from_secs(1);
                    }
                }
                Err(SendTimeoutError::Disconnected(_)) => return false,
            }
        }
    }

    fn drain_hints(&mut self, now: Instant) {
        let mut got = std::mem::take(&mut self.hint_buf);
        self.hints.take(&mut got);
        self.apply_hints(&mut got, now);
        self.hint_buf = got;
    }

    fn apply_hints(&mut self, got: &mut Vec<Hint>, now: Instant) {
        for h in got.drain(..) {
            self.hint(h, now);
        }
    }

    fn hint(&mut self, h: Hint, now: Instant) {
        match h {
            Hint::Write {
                dev,
                ino,
                dir,
                writer,
            } => match self.by_ino.get(&(dev, ino)) {
                Some(k) => {
                    if let Some(f) = self.files.get_mut(k) {
                        // Moved to another directory since it was tracked: follow the events.
                        if dir != 0 {
                            f.dir_ino = dir;
                        }
                        if let Some(w) = writer {
                            if f.writer.as_deref() != Some(&*w) {
                                tracing::debug!(path = %f.path.display(), cgroup = %w.cgroup,
                                    "file has a new writer");
                                f.writer = Some(w);
                                f.meta = meta_of(&self.sources[f.source], f, &self.events);
                            }
                        }
                        if f.next_due > now {
                            f.next_due = now;
                            self.hinted.push(*k);
                            self.events.probe_wakeup();
                        }
                    }
                }
                None => {
                    if let Some(w) = writer {
                        if self.pending_writers.len() >= PENDING_WRITERS {
                            // Writes to files that are never tracked (excluded, other
                            // mounts' files on the same device): forget them all at once.
                            self.pending_writers.clear();
                        }
                        self.pending_writers.insert((dev, ino), w);
                    }
                    // A write to a file we don't track yet under a watched mount: look soon,
                    // unless a pass looked for this one lately and did not find it.
                    if self.unmatched.get(&(dev, ino)).is_some_and(|t| now < *t) {
                        return;
                    }
                    // In a directory of tracked files: most likely a rotation's successor at
                    // a followed path, which the paths' check in the next round finds (and
                    // tracks) without a discovery pass over every directory.
                    if dir != 0
                        && self.directed.len() < UNMATCHED_KEPT
                        && self.check_paths_in(dev, dir, now)
                    {
                        self.directed.push((dev, ino));
                        return;
                    }
                    self.ask(dev, ino, now);
                }
            },
        }
    }

    fn publish_lag(&mut self) {
        // Only sizes that changed: 10,000 idle files would otherwise cost 10,000 board
        // updates a second for nothing.
        let changed: Vec<(FileKey, usize, u64)> = self
            .files
            .values_mut()
            .filter(|f| f.lag_size != f.size)
            .map(|f| {
                f.lag_size = f.size;
                (f.key, f.source, f.size)
            })
            .collect();
        if !changed.is_empty() {
            self.lag.sizes(changed);
        }
        self.publish_gauges();
    }

    /// While the reader waits for room downstream (the sink is slow or down), the files keep
    /// growing: their sizes come from a stat of each descriptor (no reading, no decisions),
    /// so that `voltail_lag_bytes` keeps rising through an outage instead of freezing at its
    /// value when the queue filled.
    fn publish_lag_waiting(&mut self) {
        let keys: Vec<FileKey> = self.files.keys().copied().collect();
        for chunk in keys.chunks(STAT_CHUNK) {
            let sizes: Vec<Result<Stat, Errno>> = {
                let mut ops: Vec<StatOp<'_>> = chunk
                    .iter()
                    .map(|k| StatOp::new(self.files[k].file.as_raw_fd(), None))
                    .collect();
                self.backend.stat_batch(&mut ops);
                ops.into_iter().map(|o| o.fd_stat).collect()
            };
            for (k, st) in chunk.iter().zip(sizes) {
                if let (Some(f), Ok(st)) = (self.files.get_mut(k), st) {
                    // Never down: a truncation is for the next poll round to decide.
                    f.size = f.size.max(st.size);
                }
            }
        }
        self.publish_lag();
    }

    fn publish_gauges(&self) {
        for (i, bytes) in self
            .lag
            .per_source(self.sources.len())
            .into_iter()
            .enumerate()
        {
            self.events.lag(&self.sources[i].name, bytes);
        }
        self.events.files_watched(self.files.len());
    }

    /// One iteration without sleeping: discovery (when `discover`), a poll round over the
    /// files due at `now`, and the open batch handed on. For tests and tools that drive the
    /// tailer step by step.
    pub fn step(&mut self, now: Instant, discover: bool) -> bool {
        if discover || now >= self.next_discovery {
            self.discover(now);
        }
        self.drain_hints(now);
        let more = self.round(now);
        let never = AtomicBool::new(false);
        while let Some(b) = self.builder.take() {
            self.send(b, &never);
        }
        more
    }

    /// The number of tracked files.
    pub fn tracked(&self) -> usize {
        self.files.len()
    }

    // ---- discovery and tracking ----

    fn discover(&mut self, now: Instant) {
        let (files, by_path) = (&self.files, &self.by_path);
        let candidates = self.discovery.scan_new(
            &self.events,
            &|p| follows(files, by_path, p),
            Some(self.by_path.gen),
        );
        let initial = !self.discovered_once;
        // A followed path in a directory whose entries changed may name another file now:
        // those files are polled, and their paths checked, in the round right after this
        // pass, so a successor is found at discovery's pace like any new file.
        let changed = self.discovery.take_changed_dirs();
        if !changed.is_empty() {
            let dirs: std::collections::HashSet<&[u8]> =
                changed.iter().map(|d| d.as_os_str().as_bytes()).collect();
            for (k, f) in self.files.iter_mut() {
                if !f.orphan && dirs.contains(f.cdir.to_bytes()) {
                    f.next_path_check = now;
                    f.dir_changed = true;
                    if f.next_due > now {
                        f.next_due = now;
                        self.schedule.push(Reverse((now, *k)));
                    }
                }
            }
        }
        // New files are opened (open, fstat, first bytes) concurrently: on a network
        // filesystem each call is a round trip, and thousands of new pods at start-up would
        // otherwise cost thousands of sequential round trips before the first read.
        // (`scan_new` already left out the paths the tailer follows.)
        let fresh: Vec<Candidate> = candidates
            .into_iter()
            .filter(|c| !self.failed_opens.contains_key(&c.path))
            .collect();
        for (c, opened) in open_all(&self.discovery, fresh) {
            self.consider(c, opened, now, initial);
        }
        self.discovered_once = true;
        self.dir_inos.clear();
        self.note_unmatched(now);
        if !self.restore.is_empty() {
            self.finish_restore(now);
        }
        let every = self
            .sources
            .iter()
            .map(|s| s.cfg.discover_interval.0)
            .min()
            .unwrap_or(Duration::from_secs(5));
        self.next_discovery = now + every;
        self.failed_opens
            .retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
        self.dir_seen
            .retain(|_, s| now.saturating_duration_since(s.last) < DIR_SEEN_KEPT);
    }

    /// Makes the followed paths of the live files in directory `dir` (inode) of device `dev`
    /// due a check now; whether there were any.
    fn check_paths_in(&mut self, dev: u64, dir: u64, now: Instant) -> bool {
        let mut any = false;
        for (k, f) in self.files.iter_mut() {
            if f.dir_ino == dir && f.dev == dev && !f.orphan {
                any = true;
                f.next_path_check = now;
                f.dir_changed = true;
                if f.next_due > now {
                    f.next_due = now;
                    self.schedule.push(Reverse((now, *k)));
                }
            }
        }
        any
    }

    /// After a round: the inodes [`Tailer::check_paths_in`] was for that it did not turn
    /// into tracked files make discovery look soon, as any unknown inode does.
    fn resolve_directed(&mut self, now: Instant) {
        for (dev, ino) in std::mem::take(&mut self.directed) {
            if !self.by_ino.contains_key(&(dev, ino)) {
                self.ask(dev, ino, now);
            }
        }
    }

    /// Has discovery look for inode `ino` of `dev`, written and not tracked, soon.
    fn ask(&mut self, dev: u64, ino: u64, now: Instant) {
        if self.asked.len() < UNMATCHED_KEPT {
            self.asked.insert((dev, ino));
        }
        let soon = now + self.soon;
        if self.next_discovery > soon {
            self.next_discovery = soon;
        }
    }

    /// The inode number of directory `dir`, with the probe on (0 otherwise, or when it cannot
    /// be stated); stated once per discovery pass.
    fn dir_ino(&mut self, dir: &Path) -> u64 {
        if self.opts.probe_poll_interval.is_none() {
            return 0;
        }
        if let Some(&ino) = self.dir_inos.get(dir) {
            return ino;
        }
        let ino = std::fs::metadata(dir).map_or(0, |m| std::os::unix::fs::MetadataExt::ino(&m));
        self.dir_inos.insert(dir.to_path_buf(), ino);
        ino
    }

    /// After a discovery pass: the inodes the probe saw written that it did not turn into
    /// tracked files stop making discovery look soon for a while ([`UNMATCHED_FOR`]).
    fn note_unmatched(&mut self, now: Instant) {
        self.unmatched.retain(|_, t| now < *t);
        if !self.asked.is_empty() {
            self.soon = if self.asked.iter().any(|k| self.by_ino.contains_key(k)) {
                SOON
            } else {
                (self.soon * 2).min(SOON_MAX)
            };
        }
        let mut mutes = Vec::new();
        for k in self.asked.drain() {
            if !self.by_ino.contains_key(&k) && self.unmatched.len() < UNMATCHED_KEPT {
                tracing::debug!(
                    dev = k.0,
                    ino = k.1,
                    "a file written under a watched mount \
                    is not collected; its writes wake discovery again in {UNMATCHED_FOR:?}"
                );
                self.unmatched.insert(k, now + UNMATCHED_FOR);
                mutes.push(Mute {
                    dev: k.0,
                    ino: k.1,
                    span: UNMATCHED_FOR,
                });
            }
        }
        // The probe drops their writes in the kernel meanwhile: no event, no wake-up.
        if !mutes.is_empty() {
            self.hints.mute(mutes);
        }
        self.events.probe_uncollected(self.unmatched.len());
    }

    fn consider(&mut self, c: Candidate, opened: Opened, now: Instant, initial: bool) {
        if follows(&self.files, &self.by_path, &c.path) {
            return;
        }
        let (file, st, prefix) = match opened {
            Ok(Some(o)) => o,
            // Gone between open and fstat.
            Ok(None) => return,
            Err(e) => {
                if !matches!(&e, crate::discovery::DiscoveryError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
                {
                    tracing::warn!(path = %c.path.display(), error = %e, "cannot open file; will retry");
                    self.failed_opens.insert(c.path.clone(), now);
                }
                return;
            }
        };
        if let Some(&k) = self.by_ino.get(&(st.dev, st.ino)) {
            // A file we track, now also (or only) under this path: renamed within the globs.
            self.rename(k, &c.path);
            return;
        }
        self.track(c.source, c.path, file, st, prefix, now, initial, false);
    }

    fn rename(&mut self, k: FileKey, path: &Path) {
        let Some(f) = self.files.get_mut(&k) else {
            return;
        };
        if f.path == path {
            if f.orphan {
                // Its path names it again (its directory vanished and came back): follow it
                // as a live file, not one being finished and released.
                tracing::info!(path = %path.display(), "file is back at its path; following it again");
                f.orphan = false;
                self.by_path.insert(path.as_os_str().to_owned(), k);
            }
            return;
        }
        // Keep the first name while it still names this file.
        if !f.orphan {
            if let Ok(p) = backend::statx_path(&f.cpath) {
                if p.ino == f.ino && p.dev == f.dev {
                    return;
                }
            }
        }
        tracing::info!(from = %f.path.display(), to = %path.display(), "file renamed");
        self.by_path.remove(f.path.as_os_str());
        f.path = path.to_path_buf();
        f.cpath = cstring(path);
        f.cdir = cstring(path.parent().unwrap_or(path));
        f.dir_stamp = None;
        f.orphan = false;
        f.meta = meta_of(&self.sources[f.source], f, &self.events);
        self.by_path.insert(path.as_os_str().to_owned(), k);
        self.builder.update(FileUpdate::Rename {
            key: k,
            path: path.to_string_lossy().into_owned(),
        });
    }

    /// Starts tracking `file`. The start offset comes from a matching checkpoint entry, else
    /// from `start_at` (first start only), else 0.
    #[allow(clippy::too_many_arguments)] // the facts a new file arrives with
    fn track(
        &mut self,
        source: usize,
        path: PathBuf,
        file: File,
        st: Stat,
        prefix: Vec<u8>,
        now: Instant,
        initial: bool,
        orphan: bool,
    ) {
        let resumed = self.take_restore(st.dev, st.ino, &prefix);
        let came_back = match resumed {
            None => self.take_released(st.dev, st.ino, &prefix, st.size),
            Some(_) => None,
        };
        if let Some(off) = came_back {
            tracing::info!(path = %path.display(), offset = off,
                "a released file is back at a watched path; resuming where it was released");
        }
        let offset = match &resumed {
            None if came_back.is_some() => came_back.unwrap_or(0),
            Some((_, e)) if e.offset <= st.size => e.offset,
            Some((_, e)) => {
                tracing::warn!(path = %path.display(), checkpoint = e.offset, size = st.size,
                    "file is shorter than its checkpoint (truncated while voltail was down); reading from 0");
                0
            }
            None if initial
                && self.opts.first_start
                && self.sources[source].cfg.start_at == StartAt::End =>
            {
                st.size
            }
            None => 0,
        };
        // A resumed file keeps its checkpoint key, so its entry is updated, not duplicated.
        let key = match &resumed {
            Some((k, _)) => *k,
            None => {
                self.next_key += 1;
                self.next_key - 1
            }
        };
        let id = FileId::new(st.dev, st.ino, &prefix);
        let dir_ino = self.dir_ino(path.parent().unwrap_or(&path));
        let src = &self.sources[source];
        let writer = self.pending_writers.remove(&(st.dev, st.ino));
        let meta = meta_for(
            src,
            key,
            &path,
            id.event_base(),
            writer.as_deref(),
            &self.events,
        );
        tracing::info!(path = %path.display(), source = %src.name, offset, id = %id,
            resumed = resumed.is_some(), "tracking file");
        self.builder.update(FileUpdate::Track {
            key,
            id,
            path: path.to_string_lossy().into_owned(),
            source: src.name.to_string(),
            offset,
        });
        let base = src.cfg.poll_interval.0;
        let t = Tracked {
            key,
            source,
            cpath: cstring(&path),
            next_path_check: now,
            path_checked_size: st.size,
            cdir: cstring(path.parent().unwrap_or(&path)),
            dir_stamp: None,
            path_verified: now,
            dir_changed: false,
            dir_ino,
            lag_size: st.size,
            path: path.clone(),
            file,
            dev: st.dev,
            ino: st.ino,
            id,
            prefix: if id.fingerprint_incomplete() {
                prefix
            } else {
                Vec::new()
            },
            meta,
            read_off: offset,
            acked_sent: offset,
            size: st.size,
            mtime_ns: st.mtime_ns,
            framer: Framer::new(offset, src.cfg.max_line_bytes, src.multiline.clone()),
            orphan,
            interval: base,
            next_due: now,
            scheduled: None,
            unstated: false,
            restat: false,
            last_change: now,
            errors: 0,
            writer,
        };
        if !orphan {
            self.by_path.insert(path.into_os_string(), key);
        }
        self.by_ino.insert((st.dev, st.ino), key);
        // Found unmatched lately (renamed into a matching name since, or its inode reused):
        // its writes wake the reader again.
        if self.unmatched.remove(&(st.dev, st.ino)).is_some() {
            self.hints.mute([Mute {
                dev: st.dev,
                ino: st.ino,
                span: Duration::ZERO,
            }]);
        }
        self.files.insert(key, t);
        // On the board before any batch can carry an ack for it, with what counts as delivered
        // already (a checkpoint's offset): otherwise the first acks are lost (the uploader may
        // apply them before the next size publish) and a file that grows no more after them,
        // or one resumed already read, shows lag until it is released.
        self.lag.track(key, source, st.size, offset);
        self.schedule.push(Reverse((now, key)));
        self.events.file_opened();
    }

    /// The offset a released file with this identity was finished at, if it is one (and
    /// still holds at least that much).
    fn take_released(&mut self, dev: u64, ino: u64, prefix: &[u8], size: u64) -> Option<u64> {
        let (id, offset) = *self.released.get(&ino)?;
        if id.matches(dev, ino, prefix) == Match::No || offset > size {
            return None;
        }
        self.released.remove(&ino);
        Some(offset)
    }

    /// Remembers a released file (the oldest is forgotten past `RELEASED_KEPT`).
    fn remember_released(&mut self, id: FileId, offset: u64) {
        if id.fp_len == 0 {
            return; // nothing to tell it from another file on the same inode
        }
        if self.released.insert(id.ino, (id, offset)).is_none() {
            self.released_order.push_back(id.ino);
        }
        while self.released_order.len() > RELEASED_KEPT {
            if let Some(old) = self.released_order.pop_front() {
                self.released.remove(&old);
            }
        }
    }

    fn take_restore(&mut self, dev: u64, ino: u64, prefix: &[u8]) -> Option<(FileKey, Entry)> {
        let list = self.restore.get_mut(&ino)?;
        let best = list
            .iter()
            .enumerate()
            .map(|(i, (_, e))| (e.id.matches(dev, ino, prefix), i))
            .filter(|(m, _)| *m != Match::No)
            .max()?;
        let e = list.swap_remove(best.1);
        if list.is_empty() {
            self.restore.remove(&ino);
        }
        Some(e)
    }

    /// After a discovery: checkpoint entries whose file was not found under a glob may have
    /// been rotated while voltail was down; look for them next to their old path and finish
    /// them. An entry is dropped only when its file is gone for sure (its directory lists
    /// without it, or is gone while the volume is there); while the volume is unreachable the
    /// entries are kept, so a mount that comes late does not make everything read again.
    fn finish_restore(&mut self, now: Instant) {
        let left: Vec<(FileKey, Entry)> = self.restore.drain().flat_map(|(_, v)| v).collect();
        let volume_up = !self.discovery.roots().is_empty();
        let mut keep = Vec::new();
        // Entries whose file still holds what they fingerprinted go first, so that an older
        // entry for a reused inode never claims a file another entry resumes.
        let mut later = Vec::new();
        for pass in 0..2 {
            let batch = if pass == 0 {
                left.clone()
            } else {
                std::mem::take(&mut later)
            };
            for (key, e) in batch {
                self.restore_one(key, e, pass, volume_up, now, &mut keep, &mut later);
            }
        }
        for (key, e) in keep {
            self.restore.entry(e.id.ino).or_default().push((key, e));
        }
    }

    /// One leftover checkpoint entry (see `finish_restore`). In pass 0 an entry whose file
    /// holds other content is put off to pass 1.
    #[allow(clippy::too_many_arguments)] // the two lists are finish_restore's, passed through
    fn restore_one(
        &mut self,
        key: FileKey,
        e: Entry,
        pass: usize,
        volume_up: bool,
        now: Instant,
        keep: &mut Vec<(FileKey, Entry)>,
        later: &mut Vec<(FileKey, Entry)>,
    ) {
        {
            let path = PathBuf::from(&e.path);
            let dir = path.parent().unwrap_or(Path::new("/"));
            let listing = match std::fs::read_dir(dir) {
                Ok(rd) => Some(rd.flatten().collect::<Vec<_>>()),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound && volume_up => None,
                Err(err) => {
                    tracing::warn!(path = %e.path, error = %err, "cannot look for a checkpointed file yet; keeping its entry");
                    keep.push((key, e));
                    return;
                }
            };
            // The file under a rotated name: same inode, named after the old file, not excluded.
            let old_name = path
                .file_name()
                .map(|n| n.as_bytes().to_vec())
                .unwrap_or_default();
            let source = self.sources.iter().position(|s| *s.name == *e.source);
            // Another replica's directory (the shard changed): not ours to finish.
            if let Some(shard) = self.shard {
                if !crate::discovery::in_shard(shard, &path) {
                    tracing::info!(path = %e.path, "checkpointed file belongs to another shard now; forgetting it");
                    self.builder.update(FileUpdate::Release { key });
                    return;
                }
            }
            let found = listing.into_iter().flatten().find(|d| {
                d.file_type().is_ok_and(|t| t.is_file())
                    && std::os::unix::fs::DirEntryExt::ino(d) == e.id.ino
                    && d.file_name().as_bytes().starts_with(&old_name)
                    && source.is_some_and(|s| !self.discovery.excluded(s, &d.path()))
            });
            let opened = found.and_then(|d| {
                let source = source?;
                let c = Candidate {
                    path: d.path(),
                    open_path: d.path(),
                    source,
                };
                let file = self.discovery.open(&c).ok()?;
                let st = backend::statx_fd(file.as_raw_fd()).ok()?;
                if self.by_ino.contains_key(&(st.dev, st.ino)) {
                    return None;
                }
                let prefix = read_prefix(&file);
                let same = e.id.matches(st.dev, st.ino, &prefix) != Match::No;
                Some((c, file, st, prefix, source, same))
            });
            match opened {
                Some((c, file, st, prefix, source, true)) => {
                    tracing::info!(old = %e.path, now_at = %c.path.display(), "finishing a file rotated while voltail was down");
                    self.restore.entry(e.id.ino).or_default().push((key, e));
                    self.track(source, c.path, file, st, prefix, now, false, true);
                }
                Some(_) if pass == 0 => later.push((key, e)),
                Some((c, file, st, prefix, source, false)) => {
                    // Same inode, other content: it was truncated (or replaced) and refilled,
                    // then rotated, all after the last checkpoint. Its content is unread.
                    tracing::info!(old = %e.path, now_at = %c.path.display(),
                        "a rotated file holds content the checkpoint never saw; reading it from 0");
                    self.builder.update(FileUpdate::Release { key });
                    self.track(source, c.path, file, st, prefix, now, false, true);
                }
                None => {
                    tracing::info!(path = %e.path, offset = e.offset, "checkpointed file is gone; forgetting it");
                    self.builder.update(FileUpdate::Release { key });
                }
            }
        }
    }

    // ---- poll rounds ----

    /// One round over the due files. Returns whether some file has more to read right away.
    fn round(&mut self, now: Instant) -> bool {
        let (due, hinted) = self.take_due(now);
        if due.is_empty() {
            self.prune_schedule();
            return false;
        }
        let started = Instant::now();
        let ts = Timestamp::now();
        let mut more = false;
        let mut to_read = Vec::new();
        let mut vacated = Vec::new();
        let mut stat = Vec::with_capacity(due.len());
        for &k in &due {
            if hinted.binary_search(&k).is_ok() && self.hinted_read(k, now) {
                to_read.push(k);
            } else {
                stat.push(k);
            }
        }
        for chunk in stat.chunks(STAT_CHUNK) {
            for (k, (fs, ps)) in chunk.iter().zip(self.stat_chunk(chunk, now)) {
                if self.after_stat(*k, fs, ps, now, &mut vacated) {
                    to_read.push(*k);
                }
            }
        }
        // Reads go in chunks bounded by bytes (the arena) and count, so a round over many
        // small growths stays one batch (one round trip with io_uring).
        let mut i = 0;
        while i < to_read.len() {
            let (mut j, mut bytes) = (i, 0usize);
            while j < to_read.len() && j - i < READ_CHUNK {
                let want = self.want(to_read[j]);
                if j > i && bytes + want > READ_ARENA {
                    break;
                }
                bytes += want;
                j += 1;
            }
            more |= self.read_chunk(&to_read[i..j], now, &ts);
            i = j;
        }
        for k in due {
            self.after_read(k, now, &ts);
        }
        for path in vacated {
            // The path's old file is finishing; its successor may already be there.
            if let Some(c) = self.discovery.check(&path, &self.events) {
                if !self.failed_opens.contains_key(&c.path) {
                    let opened = open_one(&self.discovery, &c);
                    self.consider(c, opened, now, false);
                }
            }
        }
        self.dir_inos.clear();
        if !self.directed.is_empty() {
            self.resolve_directed(now);
        }
        self.prune_schedule();
        self.events.poll_round(started.elapsed());
        more
    }

    /// Whether hinted file `k` is read without a stat this round, and if so sets it up.
    ///
    /// The probe saw a local write to it, so it grew: a stat would only say by how much, and
    /// at 10 writes a second to each of a thousand files that stat is a third of the reader's
    /// syscalls. The read asks for [`HINT_READ`] bytes at the offset instead. What the stat
    /// guards is still guarded: a read that finds nothing (truncated below the offset, or read
    /// already) makes the file due for a stated round at once; a copytruncate refilled past
    /// the offset fails the fingerprint check that goes with every read; a deletion or rename
    /// shows at the file's next poll, as it does without the probe. Files due a path check,
    /// with known unread bytes, failing, or finishing go the stated way.
    fn hinted_read(&mut self, k: FileKey, now: Instant) -> bool {
        let Some(f) = self.files.get_mut(&k) else {
            return false;
        };
        // (The per-poll directory stat of an idle file in an unlisted directory is not due:
        // a file the probe saw written is not idle.)
        if f.orphan || f.errors > 0 || f.restat || f.read_off != f.size || now >= f.next_path_check
        {
            return false;
        }
        f.unstated = true;
        true
    }

    /// Bytes to read from file `k` in this round.
    fn want(&self, k: FileKey) -> usize {
        self.files.get(&k).map_or(0, |f| {
            if f.unstated {
                return HINT_READ;
            }
            f.size.saturating_sub(f.read_off).min(READ_BUF as u64) as usize
        })
    }

    /// Stats of a chunk of due files: `(descriptor, path)`, the path's `Err(PENDING)` where it
    /// was not stated.
    ///
    /// Every file is stated once, through its descriptor: size, links, mtime, so truncation and
    /// deletion show at once. What its path names (the rename-rotation check, a lookup plus a
    /// getattr on a network volume, or three round trips) is asked only where it can have
    /// changed:
    /// - in the round a live file stops growing after it grew since its path was last checked
    ///   (a writer that moved on to a new file at the path leaves the old one still);
    /// - in the round after a discovery pass found the file's directory's entries changed
    ///   (directories discovery lists; discovery states them at every pass, so the tailer
    ///   does not: `Due::Quiet` and `Due::Changed`);
    /// - at every poll of a file that has not grown since its path was last checked, if
    ///   discovery does not list its directory; then
    ///   only if the file's directory changed: a rename, creation or removal in a directory
    ///   changes its mtime and ctime, so while its stamp is the one taken before the path last
    ///   named the file, it still does. One stat per directory and round, not one path lookup
    ///   per file. Stamps
    ///   fresher than [`RACY`] are not trusted (a second change within a coarse timestamp's
    ///   granule would not show): fresher by the wall clock and not seen unchanged for as
    ///   long by ours ([`DirStamp::seen`]), and paths are checked regardless every
    ///   [`Discovery::full_rescan_every`] intervals (12 to 96), for filesystems that do not
    ///   keep directory times; a check that finds the path moved under an unchanged stamp
    ///   tells discovery, which then keeps that spacing at its shortest.
    ///
    /// Why: until the rename of a file the tailer follows is noticed, discovery does not look
    /// at its path (see `Discovery::scan_new`), so a new file there stays unseen; if that one
    /// is rotated away too before the next check, it is never read (the model test found
    /// this). Where discovery lists the directory, it reports the change at its own pace, as
    /// for any new file; where it does not, the directory's stat at each poll does.
    ///
    /// Orphans (rotated away, deleted) are stated through their descriptor only.
    fn stat_chunk(
        &mut self,
        chunk: &[FileKey],
        now: Instant,
    ) -> Vec<(Result<Stat, Errno>, Result<Stat, Errno>)> {
        let recheck_every = self.discovery.full_rescan_every();
        let due: Vec<Due> = chunk
            .iter()
            .map(|k| {
                let f = &self.files[k];
                if f.orphan {
                    return Due::No;
                }
                // (The lookup only when needed: this runs per file and poll.)
                let listed = || {
                    self.discovery
                        .lists(Path::new(std::ffi::OsStr::from_bytes(f.cdir.to_bytes())))
                };
                if now >= f.next_path_check {
                    let every = self.sources[f.source].cfg.discover_interval.0;
                    if now.duration_since(f.path_verified) >= every * recheck_every || !listed() {
                        Due::Stamp
                    } else if f.dir_changed {
                        Due::Changed
                    } else {
                        Due::Quiet
                    }
                } else if f.size == f.path_checked_size && !listed() {
                    // An idle file in a directory discovery does not list (the glob names
                    // the file literally): its directory is stated at every poll, since no
                    // pass reports a change there.
                    Due::Stamp
                } else {
                    Due::No
                }
            })
            .collect();
        let mut dirs: Vec<&CStr> = chunk
            .iter()
            .zip(&due)
            .filter(|(_, d)| **d == Due::Stamp)
            .map(|(k, _)| self.files[k].cdir.as_c_str())
            .collect();
        dirs.sort_unstable();
        dirs.dedup();
        // Phase 1: every file's descriptor, and the directories of the files due a check.
        let (fds, dir_stats): (Vec<StatResult>, Vec<StatResult>) = {
            let mut ops: Vec<StatOp<'_>> = chunk
                .iter()
                .map(|k| StatOp::new(self.files[k].file.as_raw_fd(), None))
                .chain(dirs.iter().map(|d| StatOp::new(-1, Some(*d))))
                .collect();
            self.backend.stat_batch(&mut ops);
            let dir_ops = ops.split_off(chunk.len());
            (
                ops.into_iter().map(|o| o.fd_stat).collect(),
                dir_ops.into_iter().map(|o| o.path_stat).collect(),
            )
        };
        // Which paths to state, with the stamp their directory had before.
        let wall = wall_ns();
        let stamps: Vec<Option<DirStamp>> = {
            let (seen, racy) = (&mut self.dir_seen, self.racy);
            dir_stats
                .iter()
                .map(|r| {
                    r.ok()
                        .and_then(|st| DirStamp::seen(seen, &st, now, wall, racy))
                })
                .collect()
        };
        // (index in the chunk, the directory's stamp now, whether the stamp is the trusted one
        // from when the path last named the file: a path checked only because it was due
        // regardless, which then names another file, caught the directory's mtime hiding it)
        let mut check: Vec<(usize, Option<DirStamp>, bool)> = Vec::new();
        let mut unchanged: Vec<usize> = Vec::new();
        for (i, k) in chunk.iter().enumerate() {
            let f = &self.files[k];
            match due[i] {
                // Discovery lists the directory and reported no change to its entries.
                Due::Quiet => unchanged.push(i),
                // It did: the path is checked (the stamp is discovery's business there).
                Due::Changed => check.push((i, None, false)),
                Due::Stamp => {
                    let every = self.sources[f.source].cfg.discover_interval.0;
                    let stamp = dirs
                        .binary_search(&f.cdir.as_c_str())
                        .ok()
                        .and_then(|d| stamps[d]);
                    let recheck = now.duration_since(f.path_verified) >= every * recheck_every;
                    let same = stamp.is_some() && stamp == f.dir_stamp;
                    if same && !recheck {
                        unchanged.push(i);
                    } else {
                        check.push((i, stamp, same));
                    }
                }
                // Stopped growing after it grew since its path was last checked.
                Due::No
                    if !f.orphan
                        && f.size > f.path_checked_size
                        && matches!(fds[i], Ok(st) if st.size == f.size) =>
                {
                    check.push((i, f.dir_stamp, false));
                }
                Due::No => {}
            }
        }
        // Phase 2: those paths.
        let paths: Vec<Result<Stat, Errno>> = if check.is_empty() {
            Vec::new()
        } else {
            let mut ops: Vec<StatOp<'_>> = check
                .iter()
                .map(|&(i, _, _)| path_op(&self.files[&chunk[i]]))
                .collect();
            self.backend.stat_batch(&mut ops);
            ops.into_iter().map(|o| o.path_stat).collect()
        };
        let mut results: Vec<(Result<Stat, Errno>, Result<Stat, Errno>)> = fds
            .into_iter()
            .map(|fs| (fs, Err(Errno::PENDING)))
            .collect();
        for i in unchanged {
            if let Some(f) = self.files.get_mut(&chunk[i]) {
                f.dir_changed = false;
                f.next_path_check = now + self.sources[f.source].cfg.discover_interval.0;
                f.path_checked_size = results[i].0.map_or(f.size, |st| st.size);
            }
        }
        // A directory whose stamp seems to have hidden a change, and that stamp.
        let mut hid: Option<(CString, Option<DirStamp>)> = None;
        for ((i, stamp, same), ps) in check.into_iter().zip(paths) {
            if let Some(f) = self.files.get_mut(&chunk[i]) {
                let names_it = matches!(ps, Ok(p) if p.ino == f.ino && p.dev == f.dev);
                let moved = match ps {
                    Ok(_) => !names_it,
                    Err(e) => e.0 == libc::ENOENT,
                };
                if same && moved && hid.is_none() {
                    hid = Some((f.cdir.clone(), stamp));
                }
                f.dir_stamp = if names_it { stamp } else { None };
                f.dir_changed = false;
                if names_it {
                    f.path_verified = now;
                }
                f.next_path_check = now + self.sources[f.source].cfg.discover_interval.0;
                f.path_checked_size = results[i].0.map_or(f.size, |st| st.size);
            }
            results[i].1 = ps;
        }
        if let Some((cdir, stamp)) = hid {
            // Unless the directory changed between its stat and the path's (a rename in
            // between is no evidence): stated again, it still shows the stamp.
            let mut op = [StatOp::new(-1, Some(cdir.as_c_str()))];
            self.backend.stat_batch(&mut op);
            let (seen, racy) = (&mut self.dir_seen, self.racy);
            let again = op[0]
                .path_stat
                .ok()
                .and_then(|st| DirStamp::seen(seen, &st, now, wall_ns(), racy));
            if again.is_some() && again == stamp {
                let dir = Path::new(std::ffi::OsStr::from_bytes(cdir.to_bytes()));
                self.discovery.distrust_mtimes(dir);
            }
        }
        results
    }

    /// Interprets a file's stats. Returns whether it should be read now.
    fn after_stat(
        &mut self,
        k: FileKey,
        fs: Result<Stat, Errno>,
        ps: Result<Stat, Errno>,
        now: Instant,
        vacated: &mut Vec<PathBuf>,
    ) -> bool {
        let Some(f) = self.files.get_mut(&k) else {
            return false;
        };
        let st = match fs {
            Ok(st) => st,
            Err(e) if e.0 == libc::ESTALE || e.0 == libc::ENOENT => {
                // NFS: the descriptor is stale (a descriptor stat can say ENOENT there too).
                // Whether the file is gone is for its path to say: gone, or another file
                // there, and nothing more can be read from it; the path failing too (the
                // server is having trouble) says nothing, so try again later.
                let gone = f.orphan
                    || match ps {
                        Ok(p) => p.ino != f.ino || p.dev != f.dev,
                        Err(pe) => pe.0 == libc::ENOENT || pe.0 == libc::ENOTDIR,
                    };
                if gone {
                    tracing::warn!(path = %f.path.display(), "stale file handle; releasing the file");
                    f.orphan = true;
                    self.by_path.changed();
                    f.size = f.read_off;
                } else {
                    self.failed(k, now, Op::Stat, e);
                }
                return false;
            }
            Err(e) => {
                self.failed(k, now, Op::Stat, e);
                return false;
            }
        };
        let Some(read_off) = self.files.get(&k).map(|f| f.read_off) else {
            return false;
        };
        if st.size <= read_off {
            // Stat works and there is nothing to read: healthy (again).
            self.recovered(k);
        }
        if st.size < read_off {
            self.restart_at_zero(k, now, "file truncated; reading from 0");
        }
        let Some(f) = self.files.get_mut(&k) else {
            return false;
        };
        f.size = st.size;
        f.restat = false;
        if !f.orphan {
            // Deleted (no links left), or its path names something else or nothing. A path
            // not stated this round (`PENDING`) says nothing.
            let replaced = st.nlink == 0
                || match ps {
                    Ok(p) => p.ino != st.ino || p.dev != st.dev,
                    Err(e) => e.0 == libc::ENOENT || e.0 == libc::ENOTDIR,
                };
            if replaced {
                tracing::info!(path = %f.path.display(), "file rotated away or deleted; finishing it");
                self.events.rotation();
                f.orphan = true;
                self.by_path.remove(f.path.as_os_str());
                vacated.push(f.path.clone());
            }
        }
        // Modified without growing: maybe truncated and refilled to the very same size; the
        // read phase checks the first bytes (a zero-length read plus the fingerprint check).
        let touched =
            st.mtime_ns != f.mtime_ns && st.size == f.read_off && f.read_off > 0 && f.id.fp_len > 0;
        f.mtime_ns = st.mtime_ns;
        st.size > f.read_off || touched
    }

    /// A stat or read of file `k` failed: counted, logged (the first 3, then every 20th, so a
    /// NAS failing for minutes does not flood the log) and retried after the file's idle
    /// backoff. A stale descriptor (ESTALE) is reopened by its path first, if that names the
    /// same file.
    fn failed(&mut self, k: FileKey, now: Instant, op: Op, e: Errno) {
        self.events.read_error();
        if e.0 == libc::ESTALE && self.reopen(k) {
            return; // due again at once, through the new descriptor
        }
        let Some(f) = self.files.get_mut(&k) else {
            return;
        };
        f.errors = f.errors.saturating_add(1);
        if f.errors <= 3 || f.errors % 20 == 0 {
            let (path, attempt) = (f.path.display(), f.errors);
            match op {
                Op::Stat => {
                    tracing::warn!(path = %path, error = %e, attempt, "cannot stat file; will retry")
                }
                Op::Read => {
                    tracing::warn!(path = %path, error = %e, attempt, "read failed; will retry")
                }
            }
        }
        let s = &self.sources[f.source].cfg;
        let cap = s.max_poll_interval.0.max(s.poll_interval.0);
        f.interval = s
            .poll_interval
            .0
            .saturating_mul(1 << f.errors.min(16))
            .min(cap);
        f.next_due = now + f.interval;
        self.schedule.push(Reverse((f.next_due, k)));
    }

    /// File `k` was read (or stated with nothing to read) after failures.
    fn recovered(&mut self, k: FileKey) {
        if let Some(f) = self.files.get_mut(&k) {
            if f.errors > 0 {
                tracing::info!(path = %f.path.display(), failures = f.errors, "file readable again");
                f.errors = 0;
            }
        }
    }

    /// Replaces file `k`'s stale descriptor with a new one opened by its path, if the path
    /// still names the same file (inode and first bytes). Returns whether it did.
    fn reopen(&mut self, k: FileKey) -> bool {
        let Some(path) = self.files.get(&k).map(|f| f.path.clone()) else {
            return false;
        };
        let Some(c) = self.discovery.check(&path, &self.events) else {
            return false;
        };
        let Ok(file) = self.discovery.open(&c) else {
            return false;
        };
        let Ok(st) = backend::statx_fd(file.as_raw_fd()) else {
            return false;
        };
        let mut prefix = vec![0u8; FINGERPRINT_BYTES];
        let n = backend::pread(file.as_raw_fd(), &mut prefix, 0).unwrap_or(0);
        let Some(f) = self.files.get_mut(&k) else {
            return false;
        };
        if f.orphan || f.id.matches(st.dev, st.ino, &prefix[..n]) == Match::No {
            return false;
        }
        tracing::info!(path = %f.path.display(), "stale file handle; reopened the file by its path");
        f.file = file;
        f.next_due = Instant::now();
        self.schedule.push(Reverse((f.next_due, k)));
        true
    }

    /// The file was truncated (copytruncate): forget what was framed but not shipped, start
    /// again at 0 under a new identity.
    fn restart_at_zero(&mut self, k: FileKey, now: Instant, why: &'static str) {
        let Some(f) = self.files.get_mut(&k) else {
            return;
        };
        tracing::info!(path = %f.path.display(), offset = f.read_off, "{}", why);
        self.events.truncation();
        f.read_off = 0;
        f.framer.reset(0);
        f.prefix.clear();
        f.id = FileId::new(f.dev, f.ino, &[]);
        f.acked_sent = 0;
        f.last_change = now;
        f.next_due = now;
        self.schedule.push(Reverse((now, k)));
        self.builder.update(FileUpdate::Identity {
            key: k,
            id: f.id,
            offset: Some(0),
        });
    }

    /// Reads a chunk of files that grew. Returns whether any filled its buffer.
    fn read_chunk(&mut self, keys: &[FileKey], now: Instant, ts: &Timestamp) -> bool {
        let mut arena = std::mem::take(&mut self.arena);
        let total: usize = keys.iter().map(|k| self.want(*k)).sum();
        if arena.len() < total {
            arena.resize(total.max(READ_BUF), 0);
        }
        while self.prefix_bufs.len() < keys.len() {
            self.prefix_bufs.push(vec![0u8; FINGERPRINT_BYTES]);
        }
        let mut bufs: Vec<&mut [u8]> = Vec::with_capacity(keys.len());
        let mut rest: &mut [u8] = &mut arena[..];
        for k in keys {
            let (buf, tail) = std::mem::take(&mut rest).split_at_mut(self.want(*k));
            bufs.push(buf);
            rest = tail;
        }
        let mut prefix_bufs = std::mem::take(&mut self.prefix_bufs);
        // With each read, the file's first bytes: a file truncated and refilled past our
        // offset between two polls (copytruncate) has the same size story but another
        // fingerprint. Batched with the read, so it costs no extra round trip.
        let checks: Vec<bool> = keys
            .iter()
            .map(|k| {
                let f = &self.files[k];
                f.read_off > 0 && f.id.fp_len > 0
            })
            .collect();
        let (results, prefix_ok): (Vec<Result<usize, Errno>>, Vec<bool>) = {
            let mut ops: Vec<ReadOp<'_>> = Vec::with_capacity(2 * keys.len());
            for (k, buf) in keys.iter().zip(bufs.iter_mut()) {
                let f = &self.files[k];
                ops.push(ReadOp {
                    fd: f.file.as_raw_fd(),
                    offset: f.read_off,
                    buf,
                    result: Err(Errno::PENDING),
                });
            }
            for ((k, buf), check) in keys.iter().zip(prefix_bufs.iter_mut()).zip(&checks) {
                if *check {
                    let fd = self.files[k].file.as_raw_fd();
                    ops.push(ReadOp {
                        fd,
                        offset: 0,
                        buf: &mut buf[..],
                        result: Err(Errno::PENDING),
                    });
                }
            }
            self.backend.read_batch(&mut ops);
            let mut it = ops.into_iter();
            let results: Vec<_> = it.by_ref().take(keys.len()).map(|o| o.result).collect();
            let mut prefix_ok = Vec::with_capacity(keys.len());
            for (k, check) in keys.iter().zip(&checks) {
                if !*check {
                    prefix_ok.push(true);
                    continue;
                }
                let o = it.next().expect("one prefix op per checked file");
                let f = &self.files[k];
                prefix_ok.push(match o.result {
                    Ok(n) => f.id.matches(f.dev, f.ino, &o.buf[..n]) != Match::No,
                    Err(_) => true, // can't tell; the size check still guards
                });
            }
            (results, prefix_ok)
        };
        self.prefix_bufs = prefix_bufs;
        for (k, ok) in keys.iter().zip(&prefix_ok) {
            if !ok {
                self.restart_at_zero(
                    *k,
                    now,
                    "file was truncated and refilled (its first bytes changed); reading from 0",
                );
            }
        }
        let mut more = false;
        let mut bytes = 0u64;
        let mut lines = 0u64;
        for (((k, res), buf), ok) in keys.iter().zip(results).zip(bufs.iter()).zip(prefix_ok) {
            let unstated = self
                .files
                .get_mut(k)
                .is_some_and(|f| std::mem::take(&mut f.unstated));
            if unstated {
                self.after_hinted_read(*k, ok, &res, buf.len());
            }
            if !ok {
                continue; // read at a stale offset; the file is due again from 0
            }
            match res {
                Ok(0) => {}
                Ok(n) => {
                    bytes += n as u64;
                    self.recovered(*k);
                    lines += self.consume(*k, &buf[..n], ts);
                    if let Some(f) = self.files.get_mut(k) {
                        f.last_change = now;
                        if f.read_off < f.size || f.restat {
                            f.next_due = now;
                            more = true;
                        }
                    }
                }
                Err(e) => self.failed(*k, now, Op::Read, e),
            }
            while self.builder.is_full() {
                let Some(b) = self.builder.take() else { break };
                // Blocks while downstream is full: the files are the buffer.
                let never = AtomicBool::new(false);
                if !self.send(b, &never) {
                    tracing::error!("batch queue closed while reading");
                }
            }
        }
        drop(bufs);
        self.arena = arena;
        self.events.read(bytes, lines);
        more
    }

    /// Sets the size of file `k` after a read without a stat (before its bytes are consumed)
    /// to the end of what the read found. Where that may not be the whole story, the file
    /// stays due until a round states it (`restat`): the read filled its buffer (more to
    /// read), found nothing (a write the probe saw left nothing: truncated below the offset,
    /// or read already), or found the first bytes changed (a copytruncate; the offset is 0
    /// again). The size is never more than was seen, so the rename checks that compare it
    /// with the stat's keep working.
    fn after_hinted_read(
        &mut self,
        k: FileKey,
        ok: bool,
        res: &Result<usize, Errno>,
        asked: usize,
    ) {
        let Some(f) = self.files.get_mut(&k) else {
            return;
        };
        match res {
            Ok(n) if ok => {
                f.size = f.read_off + *n as u64;
                f.restat = *n == 0 || *n == asked;
            }
            Ok(_) => {
                f.size = f.read_off;
                f.restat = true;
            }
            // A failed read is retried after its backoff, stated.
            Err(_) => f.size = f.read_off,
        }
    }

    /// Frames `data` (read at the file's read offset) into events. Returns the lines framed.
    fn consume(&mut self, k: FileKey, data: &[u8], ts: &Timestamp) -> u64 {
        let Some(f) = self.files.get_mut(&k) else {
            return 0;
        };
        let src = &self.sources[f.source];
        // The fingerprint describes the bytes as read, never as first seen: a file may be
        // truncated and refilled between being found and being read. Recomputed whenever the
        // first bytes are read, grown while the file is short of FINGERPRINT_BYTES.
        let have = f.read_off as usize;
        if have < FINGERPRINT_BYTES && (have == 0 || f.id.fingerprint_incomplete()) {
            f.prefix.truncate(have);
            if f.prefix.len() == have {
                let take = (FINGERPRINT_BYTES - have).min(data.len());
                f.prefix.extend_from_slice(&data[..take]);
                let id = FileId::new(f.dev, f.ino, &f.prefix);
                if id != f.id {
                    f.id = id;
                    f.meta = meta_of(src, f, &self.events);
                    self.builder.update(FileUpdate::Identity {
                        key: k,
                        id,
                        offset: None,
                    });
                }
                if !id.fingerprint_incomplete() {
                    f.prefix = Vec::new();
                }
            }
        }
        let mut lines = 0u64;
        let mut splits = 0u64;
        let mut invalid = 0u64;
        let builder = &mut self.builder;
        let meta = &f.meta;
        let scratch = &mut self.scratch;
        let enc = src.encoding;
        let checked = checked_utf8(data, enc);
        f.framer.feed(data, &mut |ev: Framed<'_>| {
            lines += 1;
            splits += u64::from(ev.split);
            let (msg, bad) = if checked.contains(ev.bytes) {
                (ev.bytes, false)
            } else {
                to_utf8(ev.bytes, enc, scratch)
            };
            invalid += u64::from(bad);
            builder.push(meta, msg, ev.start, ev.end, ts);
        });
        f.read_off += data.len() as u64;
        let framed = f.framer.framed_offset();
        if framed != f.acked_sent {
            f.acked_sent = framed;
            self.builder.ack(k, framed);
        }
        if splits > 0 {
            self.events.line_split(splits);
        }
        if invalid > 0 {
            self.events.invalid_utf8(invalid);
        }
        lines
    }

    /// Schedules the file's next poll; flushes a quiet partial line; releases finished orphans.
    fn after_read(&mut self, k: FileKey, now: Instant, ts: &Timestamp) {
        let Some(f) = self.files.get_mut(&k) else {
            return;
        };
        let s = &self.sources[f.source].cfg;
        // A file with a backlog stays due: it is read again in the very next round.
        let backlog = f.read_off < f.size || f.restat;
        if f.next_due <= now && !backlog {
            let grew = f.last_change == now;
            let cap = match self.opts.probe_poll_interval {
                Some(p) => p.max(s.max_poll_interval.0),
                None => s.max_poll_interval.0,
            };
            f.interval = if grew {
                s.poll_interval.0
            } else {
                (f.interval * 2).min(cap)
            };
            f.next_due = on_grid(self.epoch, now, f.interval);
            // `on_grid` is ahead of `now`: an entry pushed for that time is still queued.
            if f.scheduled != Some(f.next_due) {
                f.scheduled = Some(f.next_due);
                self.schedule.push(Reverse((f.next_due, k)));
            }
        } else if f.next_due <= now {
            // Still due (a backlog): again in the very next round.
            self.schedule.push(Reverse((f.next_due, k)));
        }
        let quiet = now.duration_since(f.last_change);
        let finished = f.orphan && f.read_off >= f.size && quiet >= s.rotate_wait.0;
        if f.framer.pending() > 0 && (quiet >= s.flush_partial_after.0 || finished) {
            let mut lines = 0u64;
            let builder = &mut self.builder;
            let meta = &f.meta;
            let scratch = &mut self.scratch;
            let enc = self.sources[f.source].encoding;
            f.framer.flush(&mut |ev: Framed<'_>| {
                lines += 1;
                let (msg, _) = to_utf8(ev.bytes, enc, scratch);
                builder.push(meta, msg, ev.start, ev.end, ts);
            });
            let framed = f.framer.framed_offset();
            if framed != f.acked_sent {
                f.acked_sent = framed;
                self.builder.ack(k, framed);
            }
            self.events.read(0, lines);
        } else if f.framer.pending() > 0 {
            let at = f.last_change + s.flush_partial_after.0;
            if at < f.next_due {
                self.schedule.push(Reverse((at, k)));
            }
        }
        if finished {
            let f = self.files.remove(&k).expect("present above");
            tracing::info!(path = %f.path.display(), offset = f.read_off, "released finished file");
            self.by_ino.remove(&(f.dev, f.ino));
            if self.by_path.get(f.path.as_os_str()) == Some(&k) {
                self.by_path.remove(f.path.as_os_str());
            }
            self.builder.update(FileUpdate::Release { key: k });
            self.lag.remove(k);
            self.events.file_released();
            let offset = f.framer.framed_offset();
            self.remember_released(f.id, offset);
        }
    }
}

/// What failed, for the log.
#[derive(Debug, Clone, Copy)]
enum Op {
    Stat,
    Read,
}

/// Directory stamps changed this recently (by the wall clock, and not seen unchanged for as
/// long by ours) are not trusted: a rename in the same timestamp granule as the stat (1 s on
/// some NFS servers) would leave the stamp as it was. Generous, for clock skew between the
/// collector and a file server.
const RACY: Duration = crate::discovery::RACY;

/// What a directory's stat says of its entries: a rename, creation or removal in it changes its
/// mtime and ctime; replacing the directory changes its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DirStamp {
    dev: u64,
    ino: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

/// Why a file's path is to be checked in a round ([`Tailer::stat_chunk`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// Not now.
    No,
    /// If its directory's stamp says so (the directory is stated).
    Stamp,
    /// Yes: discovery, which lists the directory, found its entries changed.
    Changed,
    /// No: discovery lists the directory and found its entries unchanged.
    Quiet,
}

/// A directory's times as last stated, and since when (by our clock) it has shown them.
#[derive(Debug, Clone, Copy)]
struct DirSeen {
    mtime_ns: i64,
    ctime_ns: i64,
    since: Instant,
    last: Instant,
}

/// Directories not stated for this long are forgotten (and take [`RACY`] to be trusted again
/// by time seen).
const DIR_SEEN_KEPT: Duration = Duration::from_secs(600);

impl DirStamp {
    /// The stamp of directory stat `st` if it is old enough to trust ([`old_enough`]: `racy` old
    /// by the wall clock, or seen unchanged for `racy`).
    fn trusted(st: &Stat, wall_ns: i64, racy: Duration, seen_for: Duration) -> Option<DirStamp> {
        old_enough(st.mtime_ns.max(st.ctime_ns), wall_ns, seen_for, racy).then_some(DirStamp {
            dev: st.dev,
            ino: st.ino,
            mtime_ns: st.mtime_ns,
            ctime_ns: st.ctime_ns,
        })
    }

    /// [`DirStamp::trusted`] with `seen_for` from `seen`, which learns this stat.
    fn seen(
        seen: &mut HashMap<(u64, u64), DirSeen>,
        st: &Stat,
        now: Instant,
        wall_ns: i64,
        racy: Duration,
    ) -> Option<DirStamp> {
        let e = seen.entry((st.dev, st.ino)).or_insert(DirSeen {
            mtime_ns: st.mtime_ns,
            ctime_ns: st.ctime_ns,
            since: now,
            last: now,
        });
        if e.mtime_ns != st.mtime_ns || e.ctime_ns != st.ctime_ns {
            *e = DirSeen {
                mtime_ns: st.mtime_ns,
                ctime_ns: st.ctime_ns,
                since: now,
                last: now,
            };
        }
        e.last = now;
        DirStamp::trusted(st, wall_ns, racy, now.saturating_duration_since(e.since))
    }
}

/// When a file polled at `now` every `interval` is polled next: the last point of a grid of
/// `interval / 2` steps from `epoch` that is not after `now + interval`, so between half an
/// interval and an interval from now. Idle files that reached the same interval are thus
/// polled together, in at most two rounds per interval, instead of each at the phase it
/// happened to go idle at: ten thousand idle files cost a few wake-ups every few seconds, not
/// twenty a second, and a directory's stat (the rename check) serves all its files in one
/// round.
fn on_grid(epoch: Instant, now: Instant, interval: Duration) -> Instant {
    let t = now + interval;
    let step = interval / 2;
    if step.is_zero() || t < epoch {
        return t;
    }
    let off = t.duration_since(epoch).as_nanos() % step.as_nanos();
    // `off` < `step`, which is a Duration's nanoseconds: it fits.
    t - Duration::from_nanos(u64::try_from(off).unwrap_or(0))
}

/// A stat's outcome.
type StatResult = Result<Stat, Errno>;

/// Tracked files by path. Keyed by the path's bytes: discovery asks about every file it lists
/// on every pass (10,000 lookups each `discover_interval` for 10,000 files), and `Path`'s own
/// hash walks the path component by component. SipHash with the process's random keys (the
/// std default), not the fixed-seed xxh3 of [`FastMap`]: pods name these files, and names
/// crafted to collide under a known hash would turn every lookup into a scan.
type PathMap = HashMap<std::ffi::OsString, FileKey>;

/// Tracked files by path, with a generation that changes whenever what [`follows`] answers
/// may change: a path added or removed here, or a followed file turned orphan
/// ([`Followed::changed`]). Discovery skips a directory it found settled under the same
/// generation.
#[derive(Debug, Default)]
struct Followed {
    paths: PathMap,
    gen: u64,
}

impl Followed {
    fn get(&self, path: &std::ffi::OsStr) -> Option<&FileKey> {
        self.paths.get(path)
    }

    fn insert(&mut self, path: std::ffi::OsString, k: FileKey) {
        self.paths.insert(path, k);
        self.changed();
    }

    fn remove(&mut self, path: &std::ffi::OsStr) {
        if self.paths.remove(path).is_some() {
            self.changed();
        }
    }

    /// Something else [`follows`] reads changed (a file turned orphan).
    fn changed(&mut self) {
        self.gen = self.gen.wrapping_add(1);
    }
}

/// Whether the tailer follows a live (not orphaned) file at `path`.
fn follows(files: &FastMap<FileKey, Tracked>, by_path: &Followed, path: &Path) -> bool {
    by_path
        .get(path.as_os_str())
        .and_then(|k| files.get(k))
        .is_some_and(|f| !f.orphan)
}

/// A candidate opened: the file, its stat and its first bytes; `None` when it went away
/// between open and stat.
type Opened = Result<Option<(File, Stat, Vec<u8>)>, crate::discovery::DiscoveryError>;

/// Threads opening new files at once (an NFS client keeps dozens of RPCs in flight).
const OPEN_THREADS: usize = 32;

/// The first [`FINGERPRINT_BYTES`] of `file` (fewer when it is shorter; none on error).
fn read_prefix(file: &File) -> Vec<u8> {
    let mut prefix = vec![0u8; FINGERPRINT_BYTES];
    let n = backend::pread(file.as_raw_fd(), &mut prefix, 0).unwrap_or(0);
    prefix.truncate(n);
    prefix
}

fn open_one(d: &Discovery, c: &Candidate) -> Opened {
    let file = d.open(c)?;
    let Ok(st) = backend::statx_fd(file.as_raw_fd()) else {
        return Ok(None);
    };
    let prefix = read_prefix(&file);
    Ok(Some((file, st, prefix)))
}

/// Opens every candidate, on up to [`OPEN_THREADS`] threads when there are many; results in
/// the candidates' order.
fn open_all(d: &Discovery, cands: Vec<Candidate>) -> Vec<(Candidate, Opened)> {
    let opened = crate::par::map(&cands, OPEN_THREADS, |c| open_one(d, c));
    cands.into_iter().zip(opened).collect()
}

fn cstring(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes())
        .unwrap_or_else(|_| c"/nonexistent/path-with-nul".to_owned())
}

/// The stat of what `f`'s path names.
fn path_op(f: &Tracked) -> StatOp<'_> {
    StatOp::new(-1, Some(f.cpath.as_c_str()))
}

/// [`meta_for`] of a tracked file as it is now (path, identity, writer).
fn meta_of(src: &SourceRt, f: &Tracked, events: &Events) -> Arc<FileMeta> {
    meta_for(
        src,
        f.key,
        &f.path,
        f.id.event_base(),
        f.writer.as_deref(),
        events,
    )
}

fn meta_for(
    src: &SourceRt,
    key: FileKey,
    path: &Path,
    fp: u64,
    writer: Option<&Writer>,
    events: &Events,
) -> Arc<FileMeta> {
    let p = path.to_string_lossy();
    let tags = src.tagger.tags(&p).unwrap_or_else(|| {
        tracing::debug!(path = %p, "path does not match path_tags; shipping untagged");
        events.untagged_file();
        Vec::new()
    });
    let tags = crate::tags::with_writer(tags, writer);
    Arc::new(FileMeta::new(
        key,
        Arc::clone(&src.name),
        p.into_owned(),
        tags,
        fp,
    ))
}

/// The part of a read known to be valid UTF-8 before it is framed.
///
/// One check of the whole read runs at tens of GB/s (its ASCII fast path wants long runs);
/// the same check per line of 200 bytes ran at 5 GB/s, 8 % of the CPU of a bulk read. An
/// event whose bytes lie inside this prefix of the read buffer needs no check of its own;
/// one assembled elsewhere (a line continued from the previous read, a multiline event)
/// or past the first invalid byte is checked on its own.
struct CheckedUtf8 {
    lo: usize,
    hi: usize,
}

impl CheckedUtf8 {
    /// Whether `bytes` lie inside the checked prefix (by address: framed events are slices
    /// of the read buffer or of the framer's own buffers, which never overlap it).
    fn contains(&self, bytes: &[u8]) -> bool {
        let p = bytes.as_ptr() as usize;
        p >= self.lo && p + bytes.len() <= self.hi
    }
}

/// Checks `data` as UTF-8 once; nothing is checked when the source has its own encoding.
fn checked_utf8(data: &[u8], enc: Option<&'static Encoding>) -> CheckedUtf8 {
    let lo = data.as_ptr() as usize;
    let valid = match enc {
        Some(_) => 0,
        None => match std::str::from_utf8(data) {
            Ok(_) => data.len(),
            Err(e) => e.valid_up_to(),
        },
    };
    CheckedUtf8 { lo, hi: lo + valid }
}

/// The event as UTF-8: decoded from the source encoding, or checked (invalid sequences become
/// U+FFFD). Returns whether anything was invalid.
fn to_utf8<'a>(
    bytes: &'a [u8],
    enc: Option<&'static Encoding>,
    scratch: &'a mut String,
) -> (&'a [u8], bool) {
    match enc {
        None => match std::str::from_utf8(bytes) {
            Ok(_) => (bytes, false),
            Err(_) => {
                scratch.clear();
                scratch.push_str(&String::from_utf8_lossy(bytes));
                (scratch.as_bytes(), true)
            }
        },
        Some(enc) => {
            let (s, bad) = enc.decode_without_bom_handling(bytes);
            match s {
                std::borrow::Cow::Borrowed(s) => (s.as_bytes(), bad),
                std::borrow::Cow::Owned(s) => {
                    *scratch = s;
                    (scratch.as_bytes(), bad)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
