//! Tailer tests: explicit scenarios, and a model-based property test driving the real tailer
//! and a reference model with the same random actions.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver};
use proptest::prelude::*;

use super::pread::PreadBackend;
use super::*;
use crate::batch::{BatchLimits, Encoder, Event};
use crate::checkpoint::State;
use crate::config::SourceConfig;

/// Writes each event's message and a newline: lets the harness read batches back.
#[derive(Debug)]
struct RawEncoder;
impl Encoder for RawEncoder {
    fn encode(&mut self, ev: &Event<'_>, out: &mut Vec<u8>) {
        out.extend_from_slice(ev.message);
        out.push(b'\n');
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Delivered {
    path: String,
    offset: u64,
    message: String,
    tags: Vec<(String, String)>,
}

/// The read backends the tailer runs on: its tests run on each.
fn backend(i: usize) -> Box<dyn ReadBackend> {
    match i % 3 {
        0 => Box::new(PreadBackend),
        1 => Box::new(super::pread::PreadPool::new(4)),
        _ => match super::uring::UringBackend::new() {
            Ok(u) => Box::new(u),
            // io_uring refused here (seccomp, io_uring_disabled): the pool stands in.
            Err(_) => Box::new(super::pread::PreadPool::new(2)),
        },
    }
}

/// Counts the stat calls the tailer makes through the backend it wraps (`stats`: ops, `paths`:
/// stats of a file's path, `dirs`: of a directory).
#[derive(Debug)]
struct Counting {
    inner: Box<dyn ReadBackend>,
    stats: Arc<std::sync::atomic::AtomicU64>,
    paths: Arc<std::sync::atomic::AtomicU64>,
    dirs: Arc<std::sync::atomic::AtomicU64>,
    /// While set, directories' stats show one old mtime and ctime: a filesystem that does
    /// not keep directory times.
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl ReadBackend for Counting {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn stat_batch(&mut self, ops: &mut [StatOp<'_>]) {
        self.stats
            .fetch_add(ops.len() as u64, std::sync::atomic::Ordering::Relaxed);
        // The files are `*.log`; other paths stated are their directories.
        let files = ops
            .iter()
            .filter(|o| o.path.is_some_and(|p| p.to_bytes().ends_with(b".log")))
            .count();
        let dirs = ops.iter().filter(|o| o.path.is_some()).count() - files;
        self.paths
            .fetch_add(files as u64, std::sync::atomic::Ordering::Relaxed);
        self.dirs
            .fetch_add(dirs as u64, std::sync::atomic::Ordering::Relaxed);
        self.inner.stat_batch(ops);
        if self.frozen.load(std::sync::atomic::Ordering::Relaxed) {
            for o in ops.iter_mut() {
                if o.path.is_some_and(|p| !p.to_bytes().ends_with(b".log")) {
                    if let Ok(st) = o.path_stat.as_mut() {
                        st.mtime_ns = 1_000_000_000;
                        st.ctime_ns = 1_000_000_000;
                    }
                }
            }
        }
    }
    fn read_batch(&mut self, ops: &mut [ReadOp<'_>]) {
        self.inner.read_batch(ops);
    }
}

struct Harness {
    root: PathBuf,
    stats: Arc<std::sync::atomic::AtomicU64>,
    paths: Arc<std::sync::atomic::AtomicU64>,
    dirs: Arc<std::sync::atomic::AtomicU64>,
    frozen: Arc<std::sync::atomic::AtomicBool>,
    backend: usize,
    /// The include glob under the root.
    glob: &'static str,
    extra: String,
    tailer: Option<Tailer>,
    rx: Option<Receiver<Batch>>,
    /// The lag board of the running tailer, fed with the acks of what was delivered.
    lag: Arc<LagBoard>,
    state: State,
    persisted: Vec<Entry>,
    delivered: Vec<Delivered>,
    delivered_at_ckpt: usize,
    now: Instant,
    first: bool,
    /// The probe's end of the running tailer's mailbox: mutes the tailer posts arrive here.
    probe: Option<crate::tail::hints::HintSender>,
    /// The tailer runs as with the probe on, with this `probe_poll_interval`.
    probe_poll: Option<Duration>,
    /// Payload bytes at which a batch closes.
    batch_bytes: usize,
    /// A checkpointing delivery commits after at most this many of its batches (the uploader
    /// may commit between any two): what follows is delivered but not yet checkpointed.
    ckpt_batches: usize,
}

impl Harness {
    fn new(root: &Path, extra: &str) -> Harness {
        Harness::on(root, extra, 0)
    }

    /// A harness whose glob is `glob` under the root (`*/app.log` otherwise).
    fn globbed(root: &Path, glob: &'static str, extra: &str) -> Harness {
        let mut h = Harness::on(root, extra, 0);
        h.glob = glob;
        h.start();
        h
    }

    fn on(root: &Path, extra: &str, backend: usize) -> Harness {
        Harness::batched(root, extra, backend, 1 << 20)
    }

    /// A harness whose batches close at `batch_bytes`.
    fn batched(root: &Path, extra: &str, backend: usize, batch_bytes: usize) -> Harness {
        let mut h = Harness {
            batch_bytes,
            ckpt_batches: usize::MAX,
            root: root.to_path_buf(),
            stats: Arc::default(),
            paths: Arc::default(),
            dirs: Arc::default(),
            frozen: Arc::default(),
            backend,
            glob: "*/app.log",
            extra: extra.to_string(),
            tailer: None,
            rx: None,
            lag: Arc::default(),
            state: State::default(),
            persisted: Vec::new(),
            delivered: Vec::new(),
            delivered_at_ckpt: 0,
            now: Instant::now(),
            first: true,
            probe: None,
            probe_poll: None,
        };
        h.start();
        h
    }

    fn start(&mut self) {
        let max_poll = if self.extra.contains("max_poll_interval") {
            ""
        } else {
            "max_poll_interval = \"1s\"\n"
        };
        let src: SourceConfig = toml::from_str(&format!(
            "name = \"t\"\ninclude = [\"{}/{}\"]\npoll_interval = \"1s\"\n{max_poll}\
             rotate_wait = \"1s\"\nflush_partial_after = \"3s\"\n{}",
            self.root.display(),
            self.glob,
            self.extra
        ))
        .expect("source");
        let (tx, rx) = unbounded();
        let (htx, hrx) = crate::tail::hints::mailbox(16);
        self.probe = Some(htx);
        self.lag = Arc::default(); // a new process has a new board
        let tailer = Tailer::new(TailerParts {
            sources: vec![SourceRt::new(&src).expect("source")],
            discovery: Discovery::new(&[src], None).expect("discovery"),
            backend: Box::new(Counting {
                inner: backend(self.backend),
                stats: Arc::clone(&self.stats),
                paths: Arc::clone(&self.paths),
                dirs: Arc::clone(&self.dirs),
                frozen: Arc::clone(&self.frozen),
            }),
            builder: BatchBuilder::new(
                BatchLimits {
                    max_bytes: self.batch_bytes,
                    max_events: 100_000,
                    linger: Duration::ZERO,
                },
                Box::new(RawEncoder),
            ),
            out: tx,
            hints: hrx,
            events: Events::new(),
            lag: Arc::clone(&self.lag),
            restore: self
                .persisted
                .iter()
                .enumerate()
                .map(|(i, e)| (1_000_000 + i as u64, e.clone()))
                .collect(),
            opts: TailerOptions {
                first_start: self.first,
                probe_poll_interval: self.probe_poll,
                shard: None,
            },
        });
        self.first = false;
        self.tailer = Some(tailer);
        self.rx = Some(rx);
    }

    /// One poll step one virtual second later, then delivery of what it produced.
    fn step(&mut self, checkpoint: bool) {
        self.now += Duration::from_secs(1);
        let now = self.now;
        if let Some(t) = self.tailer.as_mut() {
            while t.step(now, true) {}
        }
        self.deliver(checkpoint);
    }

    fn deliver(&mut self, checkpoint: bool) {
        let Some(rx) = &self.rx else { return };
        let mut n = 0;
        while let Ok(b) = rx.try_recv() {
            n += 1;
            for (i, e) in b.events.iter().enumerate() {
                let bytes = b.event_bytes(i);
                self.delivered.push(Delivered {
                    path: b.files[e.file as usize].path.clone(),
                    offset: e.offset,
                    message: String::from_utf8(bytes[..bytes.len() - 1].to_vec())
                        .expect("the tailer hands out UTF-8 only"),
                    tags: b.files[e.file as usize].tags.clone(),
                });
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
            if checkpoint && n <= self.ckpt_batches {
                self.persisted = self.state.entries.values().cloned().collect();
                self.delivered_at_ckpt = self.delivered.len();
            }
        }
    }

    /// SIGKILL and restart: what was delivered after the last checkpoint is undone (the file
    /// sink truncates to its checkpointed cursor), and the tailer resumes from the checkpoint.
    fn crash(&mut self) {
        self.tailer = None;
        self.rx = None;
        self.delivered.truncate(self.delivered_at_ckpt);
        self.state = State::default();
        for (i, e) in self.persisted.iter().enumerate() {
            self.state.entries.insert(1_000_000 + i as u64, e.clone());
        }
        self.start();
    }

    /// Publishes the tracked files' sizes, as the reader does once a second, and returns the
    /// unacknowledged bytes.
    fn lag(&mut self) -> u64 {
        if let Some(t) = self.tailer.as_mut() {
            t.publish_lag();
        }
        self.lag.per_source(1)[0]
    }

    fn messages(&self) -> Vec<String> {
        self.delivered.iter().map(|d| d.message.clone()).collect()
    }
}

fn append(p: &Path, text: &str) {
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .expect("open")
        .write_all(text.as_bytes())
        .expect("write");
}

/// Where discovery lists a directory (`*/*.log`), the tailer does not state it: discovery
/// states it at every pass anyway, and the pass that finds its entries changed has the
/// followed paths there checked in the round right after it, so a file that replaced a
/// renamed idle one is found at once, and read even if it is rotated away in turn before the
/// next step.
#[test]
fn a_listed_directory_that_changed_has_its_followed_paths_checked_at_once() {
    let d = tempfile::tempdir().expect("tmp");
    for i in 0..10 {
        append(&d.path().join(format!("pod{i}/app.log")), "line\n");
    }
    let mut h = Harness::globbed(d.path(), "*/*.log", "discover_interval = \"5s\"\n");
    h.tailer.as_mut().expect("t").racy = Duration::ZERO;
    for _ in 0..4 {
        h.step(true);
    }
    let dirs = |h: &Harness| h.dirs.load(std::sync::atomic::Ordering::Relaxed);
    let before = dirs(&h);
    for _ in 0..10 {
        h.step(true);
    }
    assert_eq!(
        dirs(&h) - before,
        0,
        "directory stats by the tailer in 10 polls of 10 idle files in listed directories"
    );
    let log = d.path().join("pod3/app.log");
    std::fs::rename(&log, d.path().join("pod3/app.old")).expect("rotate");
    append(&log, "successor\n");
    h.step(true);
    // The successor is rotated away in turn: it was found in the step above, so it is read.
    std::fs::rename(&log, d.path().join("pod3/app.old2")).expect("rotate again");
    h.step(true);
    h.step(true);
    assert_eq!(
        h.messages().last().map(String::as_str),
        Some("successor"),
        "the successor was found in the step after the rename"
    );
}

/// On a filesystem that does not keep directory times, a followed path replaced in an idle
/// directory is found by the path re-check due regardless (12 `discover_interval`s), and
/// that check, having caught the directory's stamp hiding a change, tells discovery to stop
/// trusting mtimes (full re-lists and re-checks stay at their shortest spacing).
#[test]
fn a_path_replaced_under_an_unchanged_directory_stamp_is_found_and_mtimes_distrusted() {
    let d = tempfile::tempdir().expect("tmp");
    let log = d.path().join("pod0/app.log");
    append(&log, "first\n");
    let mut h = Harness::new(d.path(), "discover_interval = \"5s\"\n");
    h.tailer.as_mut().expect("t").racy = Duration::ZERO;
    h.frozen.store(true, std::sync::atomic::Ordering::Relaxed);
    for _ in 0..4 {
        h.step(true);
    }
    let trusted = |h: &Harness| h.tailer.as_ref().expect("t").discovery.mtimes_trusted();
    assert!(trusted(&h));
    std::fs::rename(&log, d.path().join("pod0/app.old")).expect("rotate");
    append(&log, "successor\n");
    for _ in 0..10 {
        h.step(true);
    }
    assert_eq!(
        h.messages(),
        ["first"],
        "the frozen stamp hides the new file"
    );
    assert!(trusted(&h));
    // Found at the re-check due regardless, whose spacing grows with discovery's full
    // re-lists while they find nothing amiss (up to 96 intervals: 480 s here).
    let mut steps = 0;
    while h.messages().len() < 2 && steps < 600 {
        h.step(true);
        steps += 1;
    }
    assert_eq!(
        h.messages(),
        ["first", "successor"],
        "found by the re-check"
    );
    assert!(
        !trusted(&h),
        "the re-check caught the stamp hiding a change"
    );
    assert_eq!(
        h.tailer.as_ref().expect("t").discovery.full_rescan_every(),
        12
    );
}

/// Writer tags: a hint naming a writer tags the file's events from the next read on, and a
/// writer named before its file is tracked tags the file's first events.
#[test]
fn a_hinted_writer_tags_the_files_events_from_the_next_read() {
    let d = tempfile::tempdir().expect("tmp");
    let a = d.path().join("a/app.log");
    append(&a, "a1\n");
    let mut h = Harness::new(d.path(), "");
    h.step(true);
    let b = d.path().join("b/app.log");
    append(&b, "b1\n");
    append(&a, "a2\n");
    let writer = Arc::new(Writer::new("/pods/docker-1.scope".to_string()));
    let now = h.now;
    let t = h.tailer.as_mut().expect("tailer");
    for p in [&a, &b] {
        t.hint(written(p, Some(Arc::clone(&writer))), now);
    }
    for _ in 0..3 {
        h.step(true);
    }
    let tagged = |msg: &str| {
        let d = h.delivered.iter().find(|d| d.message == msg).expect(msg);
        d.tags
            .iter()
            .any(|(k, v)| k == "writer_cgroup" && v == "/pods/docker-1.scope")
    };
    assert!(!tagged("a1"), "read before the writer was known");
    assert!(tagged("a2"), "read after the hint");
    assert!(
        tagged("b1"),
        "the writer was named before the file was tracked"
    );
}

/// A file the probe hinted is read without a stat, and what the stat guarded is still caught:
/// more than one read's worth, a truncation below the offset, a copytruncate refilled past it.
#[test]
fn hinted_reads_skip_the_stat_and_still_catch_truncations() {
    for b in 0..3 {
        hinted_reads_on(b);
    }
}

fn hinted_reads_on(backend: usize) {
    let d = tempfile::tempdir().expect("tmp");
    let log = d.path().join("pod/app.log");
    append(&log, "a1\n");
    let mut h = Harness::on(d.path(), "", backend);
    h.step(true);
    let stats = |h: &Harness| h.stats.load(std::sync::atomic::Ordering::Relaxed);
    // A hint and the rounds it causes, 10 ms of virtual time later: no poll is due.
    let hinted = |h: &mut Harness| rounds_10ms_later(h, Some(written(&log, None)));
    // Rounds 10 ms later without a hint: what a hinted round left due, and nothing else.
    let soon = |h: &mut Harness| rounds_10ms_later(h, None);

    append(&log, "a2\n");
    let before = stats(&h);
    hinted(&mut h);
    assert_eq!(h.messages(), ["a1", "a2"], "backend {backend}");
    assert_eq!(
        stats(&h),
        before,
        "a hinted read is not stated (backend {backend})"
    );

    // More than one hinted read's worth: the rest comes in stated rounds right after.
    let big: Vec<String> = (0..400).map(|i| format!("{i:0>99}")).collect();
    append(&log, &(big.join("\n") + "\n"));
    hinted(&mut h);
    assert_eq!(h.messages().len(), 402, "backend {backend}");
    assert_eq!(h.messages()[2..], big[..], "backend {backend}");
    assert!(
        stats(&h) > before,
        "the rest was stated (backend {backend})"
    );

    // Truncated below the offset and rewritten shorter: the hinted read finds nothing (and
    // the first bytes changed), and the round right after it starts again at 0.
    std::fs::write(&log, "b1\n").expect("truncate");
    hinted(&mut h);
    soon(&mut h);
    assert_eq!(
        h.messages().last().map(String::as_str),
        Some("b1"),
        "backend {backend}"
    );

    // Copytruncate refilled past the offset: the fingerprint read with the hinted read
    // tells, and the file is read again from 0.
    std::fs::write(&log, "c1 longer than the old content\n").expect("refill");
    hinted(&mut h);
    soon(&mut h);
    assert_eq!(
        h.messages().last().map(String::as_str),
        Some("c1 longer than the old content"),
        "backend {backend}"
    );
    assert_eq!(
        h.messages().len(),
        404,
        "nothing else, nothing twice (backend {backend})"
    );
}

/// Takes the tailer to its next discovery pass (virtual time) and runs that step.
fn pass_when_due(h: &mut Harness) {
    let t = h.tailer.as_mut().expect("t");
    h.now = h.now.max(t.next_discovery);
    let now = h.now;
    while t.step(now, false) {}
}

/// A discovery pass a probe write to an unknown file triggered, and that tracked none of the
/// files it was for, doubles the delay of the next (200 ms up to 5 s: files outside the roots
/// on the same device, a build's new files, each made a pass); one that tracks one resets it.
#[test]
fn fruitless_passes_for_unknown_writes_back_off_and_a_fruitful_one_resets() {
    let d = tempfile::tempdir().expect("tmp");
    append(&d.path().join("a/app.log"), "a1\n");
    let mut h = Harness::new(d.path(), "discover_interval = \"30s\"\n");
    h.step(true);
    let delay = |h: &Harness| {
        h.tailer
            .as_ref()
            .expect("t")
            .next_discovery
            .saturating_duration_since(h.now)
    };
    let mut seen = Vec::new();
    for i in 0..7 {
        // A new file outside any glob each time (an unmatched one stays muted).
        let other = d.path().join(format!("build/obj{i}.o"));
        append(&other, "x\n");
        rounds_10ms_later(&mut h, Some(written(&other, None)));
        seen.push(delay(&h).as_millis());
        pass_when_due(&mut h);
    }
    assert_eq!(seen, [200, 400, 800, 1600, 3200, 5000, 5000]);
    let b = d.path().join("b/app.log");
    append(&b, "b1\n");
    rounds_10ms_later(&mut h, Some(written(&b, None)));
    assert_eq!(delay(&h).as_millis(), 5000, "still backed off");
    pass_when_due(&mut h);
    let other = d.path().join("build/obj9.o");
    append(&other, "x\n");
    rounds_10ms_later(&mut h, Some(written(&other, None)));
    assert_eq!(
        delay(&h).as_millis(),
        200,
        "the pass that found b/app.log reset it"
    );
    h.deliver(false);
    assert_eq!(h.messages(), ["a1", "b1"]);
}

/// The hint the probe sends for a write to `p`: its device, inode and directory's inode.
fn written(p: &Path, writer: Option<Arc<Writer>>) -> Hint {
    let m = std::fs::metadata(p).expect("stat");
    let dir = std::fs::metadata(p.parent().expect("parent")).expect("stat dir");
    Hint::Write {
        dev: m.dev(),
        ino: m.ino(),
        dir: dir.ino(),
        writer,
    }
}

/// Takes the tailer 10 ms of virtual time on (no poll is due), gives it `hint`, runs its
/// rounds and delivers what they produced (no checkpoint).
fn rounds_10ms_later(h: &mut Harness, hint: Option<Hint>) {
    h.now += Duration::from_millis(10);
    let now = h.now;
    if let Some(t) = h.tailer.as_mut() {
        if let Some(hint) = hint {
            t.hint(hint, now);
        }
        while t.step(now, false) {}
    }
    h.deliver(false);
}

#[test]
fn rename_rotation_finishes_old_then_reads_new() {
    for b in 0..3 {
        rename_rotation_on(b);
    }
}

fn rename_rotation_on(backend: usize) {
    let d = tempfile::tempdir().expect("tmp");
    let log = d.path().join("pod/app.log");
    append(&log, "a1\na2\n");
    let mut h = Harness::on(d.path(), "", backend);
    h.step(true);
    append(&log, "a3\n");
    std::fs::rename(&log, d.path().join("pod/app.log.1")).expect("mv");
    append(&d.path().join("pod/app.log.1"), "a4\n"); // the writer had not reopened yet
    append(&log, "b1\n");
    for _ in 0..4 {
        h.step(true);
    }
    assert_eq!(h.messages(), vec!["a1", "a2", "a3", "a4", "b1"]);
    assert_eq!(
        h.tailer.as_ref().expect("t").tracked(),
        1,
        "the rotated file was released"
    );
    assert_eq!(h.delivered[4].offset, 0);
    assert_eq!(h.delivered[3].offset, 9);
}

#[test]
fn copytruncate_starts_again_at_zero() {
    let d = tempfile::tempdir().expect("tmp");
    let log = d.path().join("pod/app.log");
    append(&log, "one\ntwo\n");
    let mut h = Harness::new(d.path(), "");
    h.step(true);
    std::fs::copy(&log, d.path().join("pod/app.log.1")).expect("cp");
    OpenOptions::new()
        .write(true)
        .open(&log)
        .expect("open")
        .set_len(0)
        .expect("truncate");
    h.step(true);
    append(&log, "three\n");
    h.step(true);
    assert_eq!(h.messages(), vec!["one", "two", "three"]);
    assert_eq!(h.delivered[2].offset, 0);
}

#[test]
fn deleted_file_is_finished_and_recreated_one_read_from_zero() {
    let d = tempfile::tempdir().expect("tmp");
    let log = d.path().join("pod/app.log");
    append(&log, "x1\n");
    let mut h = Harness::new(d.path(), "");
    h.step(true);
    // Append through a descriptor that survives the delete, as a writer would.
    let mut w = OpenOptions::new().append(true).open(&log).expect("open");
    std::fs::remove_file(&log).expect("rm");
    w.write_all(b"x2\n").expect("write");
    append(&log, "y1\n");
    for _ in 0..3 {
        h.step(true);
    }
    assert_eq!(h.messages(), vec!["x1", "x2", "y1"]);
    assert_eq!(h.tailer.as_ref().expect("t").tracked(), 1);
}

#[test]
fn partial_line_waits_then_flushes() {
    let d = tempfile::tempdir().expect("tmp");
    let log = d.path().join("pod/app.log");
    append(&log, "whole\nhalf");
    let mut h = Harness::new(d.path(), "");
    h.step(true);
    assert_eq!(h.messages(), vec!["whole"]);
    append(&log, "-done\nnext");
    h.step(true);
    assert_eq!(h.messages(), vec!["whole", "half-done"]);
    for _ in 0..4 {
        h.step(true);
    }
    assert_eq!(
        h.messages(),
        vec!["whole", "half-done", "next"],
        "flushed after flush_partial_after"
    );
    assert_eq!(h.delivered[2].offset, 16);
}

/// `n` pod directories with one line in `podN/app.log` each, read once by a tailer that trusts
/// directory stamps at once (the directories were made just now).
fn idle_pods(n: usize, extra: &str) -> (tempfile::TempDir, Harness) {
    let d = tempfile::tempdir().expect("tmp");
    for i in 0..n {
        append(&d.path().join(format!("pod{i}/app.log")), "line\n");
    }
    let mut h = Harness::new(d.path(), extra);
    h.tailer.as_mut().expect("t").racy = Duration::ZERO;
    h.step(true);
    assert_eq!(h.messages().len(), n);
    (d, h)
}

#[test]
fn idle_files_are_stated_once_per_interval_and_not_between() {
    // Backs off to 8 s: 1, 2, 4, 8.
    let (_d, mut h) = idle_pods(50, "max_poll_interval = \"8s\"");
    // File stats (the directories' stats of the rename check are another test's subject).
    let count = |h: &Harness| {
        h.stats.load(std::sync::atomic::Ordering::Relaxed)
            - h.dirs.load(std::sync::atomic::Ordering::Relaxed)
    };
    // Let every file reach the 8 s interval, then count 16 s of steps.
    for _ in 0..20 {
        h.step(true);
    }
    let before = count(&h);
    let mut busy_steps = 0;
    for _ in 0..16 {
        let b = count(&h);
        h.step(true);
        busy_steps += usize::from(count(&h) > b);
    }
    assert_eq!(
        count(&h) - before,
        100,
        "each of 50 files stated twice in 16 s"
    );
    assert!(
        busy_steps <= 2,
        "the files stay in step: {busy_steps} rounds, not one per file"
    );
    let t = h.tailer.as_mut().expect("tailer");
    assert!(
        t.schedule.len() <= 2 * t.files.len(),
        "schedule holds {} entries for {} files",
        t.schedule.len(),
        t.files.len()
    );
}

/// A round states each file once, through its descriptor. Paths (the rename-rotation check,
/// two or three round trips on a network volume) are stated when a file stops growing, which
/// is when a writer has moved on to a new file at the path, and, for an idle file, only if its
/// directory changed since (one stat per directory and round).
#[test]
fn paths_are_checked_when_a_file_stops_growing_or_its_directory_changed() {
    let (d, mut h) = idle_pods(10, "discover_interval = \"5s\"\n");
    let load = |c: &Arc<std::sync::atomic::AtomicU64>| c.load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..3 {
        h.step(true);
    }
    // Idle, polled every second (max_poll_interval 1 s here) for 20 s.
    let (stats, paths, dirs) = (load(&h.stats), load(&h.paths), load(&h.dirs));
    for _ in 0..20 {
        h.step(true);
    }
    let (stats, paths, dirs) = (
        load(&h.stats) - stats,
        load(&h.paths) - paths,
        load(&h.dirs) - dirs,
    );
    assert_eq!(stats - dirs, 10 * 20, "one stat per file and round");
    assert_eq!(paths, 0, "no path stated while its directory is unchanged");
    assert_eq!(
        dirs,
        10 * 20,
        "each idle file's directory at each of its polls"
    );
    // A file rotated while idle: its directory changed, so its path is stated at its next
    // poll, and the new file at the path is read in the round after.
    let idle = d.path().join("pod1/app.log");
    std::fs::rename(&idle, d.path().join("pod1/app.log.1")).expect("rotate");
    append(&idle, "idle rotated\n");
    for _ in 0..2 {
        h.step(true);
    }
    assert_eq!(
        h.messages().last().map(String::as_str),
        Some("idle rotated")
    );
    // A growing file is read through its descriptor; the round after it stops growing, its
    // path is checked, so a rotation shows at once though the last check was just now.
    let log = d.path().join("pod0/app.log");
    for i in 0..3 {
        append(&log, &format!("grow{i}\n"));
        h.step(true);
    }
    std::fs::rename(&log, d.path().join("pod0/app.log.1")).expect("rotate");
    append(&log, "after rotation\n");
    h.step(true);
    h.step(true);
    let m = h.messages();
    assert_eq!(
        m.last().map(String::as_str),
        Some("after rotation"),
        "{m:?}"
    );
    assert_eq!(m.len(), 15);
}

#[test]
fn start_at_end_skips_existing_content_only_at_first_start() {
    let d = tempfile::tempdir().expect("tmp");
    append(&d.path().join("a/app.log"), "old\n");
    let mut h = Harness::new(d.path(), "start_at = \"end\"\n");
    h.step(true);
    append(&d.path().join("a/app.log"), "new\n");
    append(&d.path().join("b/app.log"), "born later\n");
    h.step(true);
    let mut m = h.messages();
    m.sort();
    assert_eq!(m, vec!["born later", "new"]);
}

#[test]
fn restart_resumes_at_checkpoint_even_when_the_device_number_changed() {
    let d = tempfile::tempdir().expect("tmp");
    let log = d.path().join("pod/app.log");
    let long: String = (0..20)
        .map(|i| format!("line {i:04} padding padding padding\n"))
        .collect();
    append(&log, &long);
    let mut h = Harness::new(d.path(), "");
    h.step(true);
    assert_eq!(h.delivered.len(), 20);
    // A remount gives the volume another device number.
    for e in &mut h.persisted {
        e.id.dev ^= 0xdead;
    }
    h.crash();
    append(&log, "after restart\n");
    h.step(true);
    assert_eq!(h.delivered.len(), 21, "nothing read again");
    assert_eq!(h.delivered[20].message, "after restart");
}

#[test]
fn inode_reused_by_another_file_is_read_from_zero() {
    let d = tempfile::tempdir().expect("tmp");
    let log = d.path().join("pod/app.log");
    append(&log, "first file line\n");
    let mut h = Harness::new(d.path(), "");
    h.step(true);
    let ino = std::fs::metadata(&log).expect("md").ino();
    h.crash();
    // Pretend the checkpoint says another content lived at this inode.
    for e in &mut h.persisted {
        assert_eq!(e.id.ino, ino);
        e.id.fp ^= 1;
    }
    h.crash();
    h.delivered.clear();
    h.delivered_at_ckpt = 0;
    h.step(true);
    assert_eq!(
        h.messages(),
        vec!["first file line"],
        "a different fingerprint means a new file"
    );
}

#[test]
fn rotation_while_down_is_finished_from_the_checkpoint() {
    let d = tempfile::tempdir().expect("tmp");
    let log = d.path().join("pod/app.log");
    append(&log, "before\n");
    let mut h = Harness::new(d.path(), "");
    h.step(true);
    h.tailer = None; // down
    append(&log, "written while down\n");
    std::fs::rename(&log, d.path().join("pod/app.log.1")).expect("mv");
    append(&log, "new file\n");
    h.crash();
    for _ in 0..3 {
        h.step(true);
    }
    let mut m = h.messages();
    m.sort();
    assert_eq!(m, vec!["before", "new file", "written while down"]);
}

/// Regression: `voltail_lag_bytes` never went back to 0 after restarts; a file's first acks
/// could be applied before the reader first published its size (ignored as unknown), and a
/// resumed file started with nothing acknowledged.
#[test]
fn lag_is_zero_once_everything_read_is_acked_even_across_a_restart() {
    let d = tempfile::tempdir().expect("tmp");
    let log = d.path().join("pod/app.log");
    let idle = d.path().join("idle/app.log");
    append(&log, "a1\n");
    append(&idle, "i1\ni2\n");
    let mut h = Harness::new(d.path(), "");
    // Delivered (and acknowledged) before the reader publishes sizes at all.
    h.step(true);
    assert_eq!(h.lag(), 0, "acks that came before the first size publish");
    append(&log, "a2\n");
    h.step(false);
    append(&log, "a3\n");
    h.crash();
    // The idle file is resumed fully read: nothing to read, so no ack will ever come.
    h.step(false);
    assert_eq!(h.lag(), 0, "resumed files, the idle one at its checkpoint");
    append(&log, "a4\n");
    h.step(true);
    assert_eq!(h.lag(), 0);
    assert_eq!(
        h.messages()
            .iter()
            .filter(|m| m.starts_with('a'))
            .collect::<Vec<_>>(),
        vec!["a1", "a2", "a3", "a4"]
    );
}

// ---- model-based property test ----

#[derive(Debug, Clone)]
enum Action {
    Write(usize, u8),
    Rotate(usize),
    CopyTruncate(usize),
    Delete(usize),
    /// The probe saw a write to the file now at this path: a hint, and the rounds it causes
    /// 10 ms later (no poll, no discovery pass).
    Hint(usize),
    Step,
    Checkpoint,
    Crash,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (0..3usize, 1..6u8).prop_map(|(f, n)| Action::Write(f, n)),
        1 => (0..3usize).prop_map(Action::Rotate),
        1 => (0..3usize).prop_map(Action::CopyTruncate),
        1 => (0..3usize).prop_map(Action::Delete),
        3 => (0..3usize).prop_map(Action::Hint),
        4 => Just(Action::Step),
        2 => Just(Action::Checkpoint),
        1 => Just(Action::Crash),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Must {
    ExactlyOnce,
    AtMostOnce,
}

#[derive(Debug)]
struct Line {
    text: String,
    offset: u64,
    must: Must,
    /// The inode holding it, once it no longer sits at the globbed path (rotated away).
    away: Option<u64>,
}

struct ModelFile {
    gen: u32,
    seq: u32,
    size: u64,
    lines: Vec<Line>,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
    /// Whatever happens to the files and the process, every line is delivered exactly once
    /// with its file offset, except lines that no tailer could promise: in a file truncated or
    /// deleted before they were read, or rotated away before the tailer knew the file (at
    /// most once). Nothing is delivered that was not written.
    #[test]
    fn tailer_matches_model(actions in proptest::collection::vec(action(), 1..40), backend in 0..3usize, small_batches in proptest::bool::ANY, listed in proptest::bool::ANY, probe in proptest::bool::ANY) {
        let d = tempfile::tempdir().expect("tmp");
        let root = d.path();
        let path = |i: usize| root.join(format!("pod{i}/app.log"));
        let mut files: Vec<ModelFile> = (0..3).map(|_| ModelFile { gen: 0, seq: 0, size: 0, lines: Vec::new() }).collect();
        let mut rotated = 0u32;
        // Files (slot, generation) the tailer has had a chance to discover (present at a step);
        // not inodes: tmpfs hands a freed inode number to the next file at once.
        let mut seen: std::collections::HashSet<(usize, u32)> = std::collections::HashSet::new();
        // Small batches close in the middle of a read, a few events each.
        // With them, a checkpoint commits after the first batch of a delivery, as the uploader
        // may at any batch.
        let mut h = Harness::batched(root, "", backend, if small_batches { 24 } else { 1 << 20 });
        if small_batches {
            h.ckpt_batches = 1;
        }
        // A glob whose last component is a pattern: discovery lists the pod directories, and
        // the tailer leaves their rename checks to its reports (`Due::Quiet`/`Changed`).
        // (Rotated names, `app.log.N`, do not match it either.)
        if listed {
            h.glob = "*/app.lo?";
        }
        // As with the probe on: hinted files are read without a stat, and a hint for an
        // unknown file in a directory of tracked files has their paths checked at once.
        if probe {
            h.probe_poll = Some(Duration::from_secs(3));
        }
        if listed || probe {
            h.start();
        }
        let step = |h: &mut Harness, ckpt: bool, seen: &mut std::collections::HashSet<(usize, u32)>, files: &[ModelFile]| {
            for (i, f) in files.iter().enumerate() {
                if path(i).exists() {
                    seen.insert((i, f.gen));
                }
            }
            h.step(ckpt);
        };
        let here = |f: &mut ModelFile| f.lines.iter_mut().filter(|l| l.away.is_none()).for_each(|l| l.must = Must::AtMostOnce);
        for a in actions {
            match a {
                Action::Write(i, n) => {
                    let mut text = String::new();
                    let f = &mut files[i];
                    for _ in 0..n {
                        let line = format!("f{i}-g{}-s{}", f.gen, f.seq);
                        f.lines.push(Line { text: line.clone(), offset: f.size, must: Must::ExactlyOnce, away: None });
                        f.size += line.len() as u64 + 1;
                        f.seq += 1;
                        text.push_str(&line);
                        text.push('\n');
                    }
                    append(&path(i), &text);
                    // With the probe on the writers are local: the probe reports each write.
                    // (Unreported writes, from other nodes, wait for the slower safety poll,
                    // and a successor rotated away within it is not read: the trade
                    // `probe_poll_interval` makes.)
                    if probe {
                        rounds_10ms_later(&mut h, Some(written(&path(i), None)));
                    }
                }
                Action::Rotate(i) => {
                    if let Ok(md) = std::fs::metadata(path(i)) {
                        rotated += 1;
                        std::fs::rename(path(i), root.join(format!("pod{i}/app.log.{rotated}"))).expect("mv");
                        let known = seen.contains(&(i, files[i].gen));
                        let f = &mut files[i];
                        for l in f.lines.iter_mut().filter(|l| l.away.is_none()) {
                            l.away = Some(md.ino());
                            if !known {
                                l.must = Must::AtMostOnce;
                            }
                        }
                        f.gen += 1;
                        f.size = 0;
                    }
                }
                Action::CopyTruncate(i) => {
                    if path(i).exists() {
                        here(&mut files[i]);
                        OpenOptions::new().write(true).open(path(i)).expect("open").set_len(0).expect("truncate");
                        files[i].gen += 1;
                        files[i].size = 0;
                        step(&mut h, false, &mut seen, &files);
                    }
                }
                Action::Delete(i) => {
                    if path(i).exists() {
                        std::fs::remove_file(path(i)).expect("rm");
                        here(&mut files[i]);
                        files[i].gen += 1;
                        files[i].size = 0;
                    }
                }
                Action::Hint(i) => {
                    // Not a chance to discover (`seen`): no pass runs. A hinted round that
                    // finds a rotation may look at the vacated path, which only reads more.
                    if path(i).exists() {
                        rounds_10ms_later(&mut h, Some(written(&path(i), None)));
                    }
                }
                Action::Step => step(&mut h, false, &mut seen, &files),
                Action::Checkpoint => step(&mut h, true, &mut seen, &files),
                Action::Crash => {
                    // After a restart a rotated file is found only through its checkpoint entry.
                    // (It is looked for in its old directory, by inode: an entry for the same
                    // inode number elsewhere is another file that had the number before.)
                    for (i, f) in files.iter_mut().enumerate() {
                        let p = path(i).display().to_string();
                        for l in f.lines.iter_mut() {
                            if let Some(ino) = l.away {
                                if !h.persisted.iter().any(|e| e.id.ino == ino && e.path == p) {
                                    l.must = Must::AtMostOnce;
                                }
                            }
                        }
                    }
                    h.crash();
                    seen.clear();
                }
            }
        }
        for _ in 0..12 {
            step(&mut h, true, &mut seen, &files);
        }
        let mut count: HashMap<&str, usize> = HashMap::new();
        for dl in &h.delivered {
            *count.entry(dl.message.as_str()).or_default() += 1;
        }
        let expected: HashMap<&str, &Line> = files.iter().flat_map(|f| f.lines.iter()).map(|l| (l.text.as_str(), l)).collect();
        for dl in &h.delivered {
            let e = expected.get(dl.message.as_str());
            prop_assert!(e.is_some(), "delivered a line never written: {:?}", dl);
            prop_assert_eq!(e.map(|e| e.offset), Some(dl.offset), "wrong offset for {:?}", dl);
        }
        for (text, l) in &expected {
            let n = count.get(text).copied().unwrap_or(0);
            match l.must {
                Must::ExactlyOnce => prop_assert_eq!(n, 1, "line {} delivered {} times: {:?}", text, n, h.delivered),
                Must::AtMostOnce => prop_assert!(n <= 1, "line {} delivered {} times", text, n),
            }
        }
    }
}

/// Regression: a file truncated and refilled between being found and being read kept the
/// fingerprint of the content first seen; after a restart it no longer matched and was read
/// again (a duplicate).
#[test]
fn fingerprint_follows_the_bytes_read_not_first_seen() {
    let d = tempfile::tempdir().expect("tmp");
    let log = d.path().join("pod2/app.log");
    append(&log, "f2-g0-s0\n");
    let mut h = Harness::new(d.path(), "");
    h.step(false);
    std::fs::remove_file(&log).expect("rm");
    append(&log, "f2-g1-s1\n");
    h.step(false); // the new file is found (fingerprinted) but not read yet
    OpenOptions::new()
        .write(true)
        .open(&log)
        .expect("open")
        .set_len(0)
        .expect("truncate");
    h.step(false);
    append(&log, "f2-g2-s2\n");
    h.step(true);
    h.crash();
    h.step(true);
    assert_eq!(h.messages(), vec!["f2-g0-s0", "f2-g2-s2"]);
}

/// Invalid bytes become U+FFFD in their own line only, whether the line lies in one read
/// (checked with the whole read) or continues one from an earlier read (checked alone); a
/// character cut in two by the end of a read is whole again.
#[test]
fn invalid_utf8_is_replaced_in_its_line_only() {
    let d = tempfile::tempdir().expect("tmp");
    let log = d.path().join("pod/app.log");
    let write = |bytes: &[u8]| {
        std::fs::create_dir_all(log.parent().expect("parent")).expect("mkdir");
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open")
            .write_all(bytes)
            .expect("write");
    };
    write(b"ok1\nbad \xff here\nok2 \xc3\xa9\ntail \xc3");
    let mut h = Harness::new(d.path(), "");
    h.step(true);
    assert_eq!(h.messages(), vec!["ok1", "bad \u{fffd} here", "ok2 é"]);
    write(b"\xa9 end\nlast \xfe\nnext \xc3\xa9\n");
    h.step(true);
    assert_eq!(h.messages()[3..], ["tail é end", "last \u{fffd}", "next é"]);
}

#[test]
fn gbk_files_are_decoded_to_utf8() {
    let d = tempfile::tempdir().expect("tmp");
    let log = d.path().join("pod/app.log");
    let (gbk, _, _) = encoding_rs::GBK.encode("日志 第一行\n错误: 磁盘已满\n");
    std::fs::create_dir_all(log.parent().expect("parent")).expect("mkdir");
    std::fs::write(&log, &gbk).expect("write");
    let mut h = Harness::new(d.path(), "encoding = \"gbk\"\n");
    h.step(true);
    assert_eq!(h.messages(), vec!["日志 第一行", "错误: 磁盘已满"]);
    assert_eq!(
        h.delivered[1].offset, 12,
        "offsets are byte offsets in the GBK file"
    );
}

#[test]
fn multiline_events_are_joined_and_offsets_kept() {
    let d = tempfile::tempdir().expect("tmp");
    let log = d.path().join("pod/app.log");
    append(
        &log,
        "2026-01-01 boom\n  at a.rs:1\n  at b.rs:2\n2026-01-01 next\n",
    );
    let mut h = Harness::new(d.path(), "multiline.start_pattern = '^\\d{4}-'\n");
    h.step(true);
    assert_eq!(
        h.messages(),
        vec!["2026-01-01 boom\n  at a.rs:1\n  at b.rs:2"]
    );
    for _ in 0..4 {
        h.step(true);
    }
    assert_eq!(
        h.messages().len(),
        2,
        "the last event is flushed after flush_partial_after"
    );
    assert_eq!(h.delivered[1].offset, 40);
}

/// Regression: a pod directory that vanished (moved away, an NFS export hiccup) for longer
/// than `rotate_wait` had its file finished and released; when it came back, the same file was
/// tracked as new and read again from 0, shipping every line twice.
#[test]
fn directory_that_vanishes_and_comes_back_is_not_read_again() {
    for b in 0..3 {
        let d = tempfile::tempdir().expect("tmp");
        let root = d.path().join("root");
        let (pod, away) = (root.join("pod"), d.path().join("away"));
        let log = pod.join("app.log");
        append(&log, "a1 first line of the pod\na2\n");
        let mut h = Harness::on(&root, "", b);
        h.step(true);
        std::fs::rename(&pod, &away).expect("the directory vanishes");
        // Noticed at the next check of the quiet file's path (every `discover_interval`),
        // then finished after `rotate_wait`.
        for _ in 0..12 {
            h.step(true);
        }
        assert_eq!(h.tailer.as_ref().expect("t").tracked(), 0, "released");
        std::fs::rename(&away, &pod).expect("and comes back");
        append(&log, "a3\n");
        for _ in 0..3 {
            h.step(true);
        }
        assert_eq!(h.messages(), vec!["a1 first line of the pod", "a2", "a3"]);
        assert_eq!(h.tailer.as_ref().expect("t").tracked(), 1);
    }
}

/// Regression: a file whose directory vanished briefly while it was being written stayed an
/// orphan after the directory came back (it was "renamed" to its own path, which did
/// nothing); once quiet for `rotate_wait` it was released and read again from 0.
#[test]
fn file_back_at_its_path_is_followed_again_not_finished() {
    let d = tempfile::tempdir().expect("tmp");
    let root = d.path().join("root");
    let (pod, away) = (root.join("pod"), d.path().join("away"));
    let log = pod.join("app.log");
    append(&log, "b1 first line of the pod\n");
    let mut h = Harness::new(&root, "");
    h.step(true);
    let mut w = OpenOptions::new().append(true).open(&log).expect("open");
    std::fs::rename(&pod, &away).expect("the directory vanishes");
    w.write_all(b"b2\n").expect("write");
    h.step(true);
    std::fs::rename(&away, &pod).expect("and comes back");
    w.write_all(b"b3\n").expect("write");
    // Quiet for longer than rotate_wait: a file being finished would be released here.
    for _ in 0..4 {
        h.step(true);
    }
    w.write_all(b"b4\n").expect("write");
    for _ in 0..4 {
        h.step(true);
    }
    assert_eq!(
        h.messages(),
        vec!["b1 first line of the pod", "b2", "b3", "b4"]
    );
    assert_eq!(h.tailer.as_ref().expect("t").tracked(), 1);
}

#[test]
fn directory_stamps_changed_within_the_racy_window_are_not_trusted() {
    let st = Stat {
        dev: 1,
        ino: 2,
        mtime_ns: 100_000_000_000,
        ctime_ns: 105_000_000_000,
        ..Stat::default()
    };
    let racy = Duration::from_secs(10);
    // The newer of mtime and ctime counts: 105 s; trusted from 115 s on.
    assert_eq!(
        super::DirStamp::trusted(&st, 114_000_000_000, racy, Duration::ZERO),
        None
    );
    let s = super::DirStamp::trusted(&st, 115_000_000_000, racy, Duration::ZERO).expect("trusted");
    let renamed = Stat {
        ctime_ns: 106_000_000_000,
        ..st
    };
    assert_ne!(
        Some(s),
        super::DirStamp::trusted(&renamed, 200_000_000_000, racy, Duration::ZERO)
    );
    let replaced = Stat { ino: 3, ..st };
    assert_ne!(
        Some(s),
        super::DirStamp::trusted(&replaced, 200_000_000_000, racy, Duration::ZERO)
    );
}

#[test]
fn idle_polls_fall_on_a_grid_of_half_intervals_within_an_interval() {
    let epoch = Instant::now();
    let i = Duration::from_secs(10);
    for off_ms in [0u64, 1, 2_499, 5_000, 7_777, 9_999, 123_456] {
        let now = epoch + Duration::from_millis(off_ms);
        let next = super::on_grid(epoch, now, i);
        assert!(
            next > now + i / 2 - Duration::from_nanos(1) && next <= now + i,
            "{off_ms}: {next:?}"
        );
        assert_eq!(
            next.duration_since(epoch).as_nanos() % (i / 2).as_nanos(),
            0,
            "{off_ms}"
        );
    }
    // Files going idle at different moments meet on the grid.
    let a = super::on_grid(epoch, epoch + Duration::from_millis(5_100), i);
    let b = super::on_grid(epoch, epoch + Duration::from_millis(9_900), i);
    assert_eq!(a, b);
    // Degenerate intervals are not aligned.
    assert_eq!(
        super::on_grid(epoch, epoch, Duration::from_nanos(1)),
        epoch + Duration::from_nanos(1)
    );
}

/// A write the probe saw to a file no glob takes makes discovery look once, not at every
/// write: the pass that finds it unmatched quiets it for [`UNMATCHED_FOR`], while a write to a
/// new file that matches still makes discovery look at once.
#[test]
fn writes_to_an_uncollected_file_wake_discovery_once_not_at_every_write() {
    let d = tempfile::tempdir().expect("tmp");
    append(&d.path().join("a/app.log"), "a1\n");
    let debug = d.path().join("a/debug.txt");
    append(&debug, "d1\n");
    let mut h = Harness::new(d.path(), "discover_interval = \"30s\"\n");
    h.step(true);
    let hint = |p: &Path| written(p, None);
    // Sooner than the regular pass (30 s): within SOON_MAX.
    let soon =
        |h: &Harness| h.tailer.as_ref().expect("t").next_discovery <= h.now + super::SOON_MAX;
    // The first write: discovery looks within 200 ms, and finds nothing to collect.
    rounds_10ms_later(&mut h, Some(hint(&debug)));
    assert!(soon(&h), "an unknown inode makes discovery look soon");
    pass_when_due(&mut h);
    assert!(!soon(&h), "the pass ran");
    // Later writes to it leave discovery at its pace.
    for _ in 0..5 {
        append(&debug, "d\n");
        rounds_10ms_later(&mut h, Some(hint(&debug)));
        assert!(
            !soon(&h),
            "a write to a file found unmatched wakes discovery again"
        );
    }
    // A new file that matches still wakes it at once, and is read then.
    let b = d.path().join("b/app.log");
    append(&b, "b1\n");
    rounds_10ms_later(&mut h, Some(hint(&b)));
    assert!(soon(&h), "a new matching file makes discovery look soon");
    pass_when_due(&mut h);
    h.deliver(false);
    assert_eq!(h.messages(), ["a1", "b1"]);
    // The probe was asked to drop the unmatched file's writes in the kernel for as long.
    let m = std::fs::metadata(&debug).expect("stat");
    let mutes = h.probe.as_ref().expect("probe end").take_mutes();
    assert_eq!(
        mutes,
        [crate::tail::hints::Mute {
            dev: m.dev(),
            ino: m.ino(),
            span: UNMATCHED_FOR
        }]
    );
    // After UNMATCHED_FOR, a write to the unmatched file makes discovery look once more.
    h.now += UNMATCHED_FOR;
    let now = h.now;
    while h.tailer.as_mut().expect("t").step(now, false) {}
    rounds_10ms_later(&mut h, Some(hint(&debug)));
    assert!(soon(&h), "the quiet ends");
    pass_when_due(&mut h);
    assert_eq!(h.probe.as_ref().expect("probe end").take_mutes().len(), 1);
    // Renamed into a name the glob takes: tracked at the next regular pass, read, and its
    // writes wake the reader again (the mute is lifted).
    let c = d.path().join("c");
    std::fs::create_dir(&c).expect("mkdir");
    std::fs::rename(&debug, c.join("app.log")).expect("rename");
    for _ in 0..6 {
        h.step(true);
    }
    assert_eq!(h.messages().len(), 2 + 6, "{:?}", h.messages());
    assert_eq!(
        h.probe.as_ref().expect("probe end").take_mutes(),
        [crate::tail::hints::Mute {
            dev: m.dev(),
            ino: m.ino(),
            span: Duration::ZERO
        }],
        "the mute is lifted once the file is collected"
    );
}

/// A directory whose times lie ahead of our wall clock (a file server whose clock runs ahead)
/// is trusted once its stamp has been seen unchanged for the racy window: an idle file's path
/// is then no longer stated at every poll, only its directory. A change to the directory
/// still has the path checked.
#[test]
fn a_directory_stamped_in_the_future_is_trusted_once_seen_long_enough() {
    let d = tempfile::tempdir().expect("tmp");
    let pod = d.path().join("pod0");
    let log = pod.join("app.log");
    append(&log, "first\n");
    // Literal: discovery does not list the directory, so the idle file's directory is stated
    // at every poll and its path whenever the stamp is not trusted.
    let mut h = Harness::globbed(d.path(), "pod0/app.log", "");
    let ahead = std::time::SystemTime::now() + Duration::from_secs(3600);
    let set_mtime = |t| {
        std::fs::File::open(&pod)
            .expect("open dir")
            .set_times(std::fs::FileTimes::new().set_modified(t))
            .expect("set mtime");
    };
    set_mtime(ahead);
    for _ in 0..15 {
        h.step(true);
    }
    let paths = |h: &Harness| h.paths.load(std::sync::atomic::Ordering::Relaxed);
    let before = paths(&h);
    for _ in 0..10 {
        h.step(true);
    }
    assert_eq!(
        paths(&h) - before,
        0,
        "an idle file's path stated while its directory's stamp stayed the same"
    );
    // A rename in the directory changes the stamp: the path is checked, the successor found.
    std::fs::rename(&log, pod.join("app.old")).expect("rotate");
    append(&log, "successor\n");
    set_mtime(ahead);
    h.step(true);
    h.step(true);
    assert_eq!(h.messages(), ["first", "successor"]);
}

/// With the probe on, a write to an unknown file in a directory of tracked files the probe
/// reported writes to (a rotation's successor) has that directory's followed paths checked in
/// the next round: the successor is tracked and read at once, with no discovery pass over
/// every directory. A file there that no glob takes is left to a discovery pass soon, as
/// before. Both where discovery lists the directory and where it does not.
#[test]
fn a_rotation_the_probe_reports_is_followed_without_a_discovery_pass() {
    for glob in ["*/app.log", "*/app.lo?"] {
        let d = tempfile::tempdir().expect("tmp");
        let log = d.path().join("pod0/app.log");
        append(&log, "a1\n");
        append(&d.path().join("pod1/app.log"), "other\n");
        let mut h = Harness::globbed(d.path(), glob, "discover_interval = \"5s\"\n");
        h.probe_poll = Some(Duration::from_secs(10));
        h.start();
        h.step(true);
        // The local writer wrote it: the probe's event names the file's directory.
        append(&log, "a2\n");
        rounds_10ms_later(&mut h, Some(written(&log, None)));
        let next_discovery = |h: &Harness| h.tailer.as_ref().expect("t").next_discovery;
        let soon = |h: &Harness| next_discovery(h) <= h.now + Duration::from_millis(200);
        std::fs::rename(&log, d.path().join("pod0/app.log.1")).expect("rotate");
        append(&log, "b1\n");
        rounds_10ms_later(&mut h, Some(written(&log, None)));
        // The successor was tracked at the end of that round; the next one reads it.
        rounds_10ms_later(&mut h, None);
        let mut got = h.messages();
        got.sort();
        assert_eq!(got, ["a1", "a2", "b1", "other"], "{glob}");
        assert!(
            !soon(&h),
            "{glob}: a discovery pass for a rotation at a followed path"
        );
        // A file no glob takes, in the same directory: the paths' check does not find it, so
        // discovery looks soon.
        let debug = d.path().join("pod0/debug.txt");
        append(&debug, "d\n");
        rounds_10ms_later(&mut h, Some(written(&debug, None)));
        assert!(
            soon(&h),
            "{glob}: an unknown file the paths' check did not explain"
        );
    }
}
