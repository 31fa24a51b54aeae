//! Faults: the real binary SIGKILLed in a loop under rotation, a full and a read-only disk,
//! two instances racing for one `data_dir`, a checkpoint carried to another machine, and
//! filesystem errors on a NAS.
//!
//! Every test ends with the same check: every line written is in the file sink exactly once.
//! Randomness is seeded; the seed is printed at the start and again on failure, and
//! `VOLTAIL_SEED=<n>` replays it. `VOLTAIL_LONG=1` runs the long variants.
//!
//! Filesystem errors (EIO, ESTALE, vanishing directories) are injected by the slow-NAS FUSE
//! stand-in of `xtask` (`xtask::slownas::faults`), mounted under the collector.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use voltail::checkpoint;
use voltail::generate::{self, GenerateOptions};
use voltail_tests::{assert_exactly_once, gen, log_files, must_run, Collector, Setup};

/// Whether the long variants run.
fn long() -> bool {
    std::env::var("VOLTAIL_LONG").is_ok_and(|v| v == "1")
}

/// The seed: `VOLTAIL_SEED` or a fresh one, printed either way.
fn seed(test: &str) -> u64 {
    let s = std::env::var("VOLTAIL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("{test}: seed {s} (replay with VOLTAIL_SEED={s})");
    s
}

/// Prints the seed again when the test fails, next to the panic message, and keeps a copy of
/// the test's directory (logs, checkpoint, sink, collector logs) for the post-mortem.
struct SeedOnFailure(&'static str, u64, Option<PathBuf>);

impl Drop for SeedOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{} FAILED with seed {}: replay with VOLTAIL_SEED={}",
                self.0, self.1, self.1
            );
            if let Some(dir) = &self.2 {
                let keep = std::env::temp_dir().join(format!("voltail-{}-{}", self.0, self.1));
                let ok = Command::new("cp").arg("-a").arg(dir).arg(&keep).status();
                eprintln!("test directory kept in {} ({ok:?})", keep.display());
            }
        }
    }
}

/// The HTTP status of `GET path` on the metrics port (None: nothing listening yet).
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    r.split_whitespace().nth(1)?.parse().ok()
}

/// The acknowledged offset the checkpoint in `data` holds for inode `ino`, if it tracks it.
fn acked(data: &Path, ino: u64) -> Option<u64> {
    let l = checkpoint::read_only(data).ok()?;
    l.entries.iter().find(|e| e.id.ino == ino).map(|e| e.offset)
}

/// Every line of every regular file under `dir` (the pods' `access.log`, their renamed
/// `access.log.N` and their copytruncate copies `ct.N`).
fn all_lines(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let text = std::fs::read_to_string(&p).expect("read log");
                out.extend(text.lines().map(String::from));
            }
        }
    }
    out
}

/// Compares the sink's messages with the lines written, as multisets (rotated files are
/// shipped under the path they were read at, so content is the key; every line is unique).
fn assert_same_lines(messages: &[String], written: &[String]) {
    let mut got: HashMap<&str, usize> = HashMap::new();
    for m in messages {
        *got.entry(m.as_str()).or_default() += 1;
    }
    let mut want: HashMap<&str, usize> = HashMap::new();
    for w in written {
        *want.entry(w.as_str()).or_default() += 1;
    }
    assert_eq!(want.len(), written.len(), "the test writes unique lines");
    let dups: Vec<_> = got.iter().filter(|(_, n)| **n > 1).take(5).collect();
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let unexpected: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        dups.is_empty() && missing.is_empty() && unexpected.is_empty(),
        "{} lines written, {} shipped; {} duplicated (e.g. {dups:?}), {} missing (e.g. {:?}), \
         {} unexpected (e.g. {:?})",
        written.len(),
        messages.len(),
        got.values().filter(|n| **n > 1).count(),
        missing.len(),
        &missing[..missing.len().min(5)],
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)],
    );
}

/// Waits until the sink holds at least `n` events.
fn wait_sink(s: &Setup, n: usize, timeout: Duration) -> usize {
    let end = Instant::now() + timeout;
    loop {
        let got = s.sink().len();
        if got >= n || Instant::now() > end {
            return got;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// One file the crash-loop writer appends to.
struct Target {
    dir: PathBuf,
    file: File,
    seq: u64,
    rotations: u32,
}

impl Target {
    fn path(&self) -> PathBuf {
        self.dir.join("access.log")
    }
    fn ino(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().expect("stat").ino()
    }
}

fn open_append(p: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .expect("open for append")
}

/// Waits (across kills and restarts) until `pred` holds for what the checkpoint says of `ino`.
fn wait_checkpoint(data: &Path, ino: u64, what: &str, pred: impl Fn(Option<u64>) -> bool) {
    let end = Instant::now() + Duration::from_secs(90);
    while !pred(acked(data, ino)) {
        assert!(
            Instant::now() < end,
            "checkpoint never got to {what} for inode {ino}: {:?}",
            acked(data, ino)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Appends to 200 files, rotating some by rename and some by copytruncate, until `stop`.
/// A file is rotated only once the checkpoint tracks it (a file must sit at its globbed path for
/// one poll to be seen at all), and copytruncated only once the checkpoint acknowledged all of
/// it (what is written between the last read and the truncation is lost by design), so every
/// line written must reach the sink.
fn crash_loop_writer(logs: &Path, data: &Path, seed: u64, stop: &AtomicBool) -> (u64, u32, u32) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut targets: Vec<Target> = (0..200)
        .map(|i| {
            let dir = generate::pod_dir(logs, "nginx", i);
            std::fs::create_dir_all(&dir).expect("mkdir pod");
            Target {
                file: open_append(&dir.join("access.log")),
                dir,
                seq: 0,
                rotations: 0,
            }
        })
        .collect();
    let (mut lines, mut renames, mut truncations) = (0u64, 0u32, 0u32);
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..10 {
            let i = rng.usize(..targets.len());
            let t = &mut targets[i];
            let pad = "x".repeat(rng.usize(10..200));
            writeln!(t.file, "f{i:03} s{} {pad}", t.seq).expect("write");
            t.seq += 1;
            lines += 1;
        }
        let roll = rng.u32(..1000);
        if roll < 8 {
            // Rename rotation; the writer writes one more line to the old file before reopening.
            let i = rng.usize(..targets.len());
            let t = &mut targets[i];
            let ino = t.ino();
            wait_checkpoint(data, ino, "tracking the file", |o| o.is_some());
            t.rotations += 1;
            let to = t.dir.join(format!("access.log.{}", t.rotations));
            std::fs::rename(t.path(), &to).expect("rename");
            writeln!(t.file, "f{i:03} s{} late after rename", t.seq).expect("late write");
            t.seq += 1;
            lines += 1;
            t.file = open_append(&t.path());
            renames += 1;
        } else if roll < 14 {
            // copytruncate, paced: the copy holds only lines already delivered.
            let i = rng.usize(..targets.len());
            let t = &mut targets[i];
            let (ino, len) = (t.ino(), t.file.metadata().expect("stat").len());
            if len > 0 {
                wait_checkpoint(data, ino, "the end of the file", |o| o == Some(len));
                t.rotations += 1;
                std::fs::copy(t.path(), t.dir.join(format!("ct.{}", t.rotations))).expect("copy");
                t.file.set_len(0).expect("truncate");
                truncations += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (lines, renames, truncations)
}

#[test]
fn crash_loop_with_rotation_and_copytruncate_is_exactly_once() {
    let seed = seed("crash_loop");
    let kills = if long() { 50 } else { 12 };
    let mut rng = fastrand::Rng::with_seed(seed);
    let s = Setup::new();
    let _guard = SeedOnFailure("crash_loop", seed, Some(s.tmp.path().to_path_buf()));
    // Small segments so that kills land around segment rolls too.
    let cfg = s.config("", "segment_max_bytes = 262144");
    let stop = Arc::new(AtomicBool::new(false));
    let c = Collector::start(&cfg, s.port);
    assert!(c.wait_up(Duration::from_secs(30)), "{}", c.log_text());
    let writer = {
        let (logs, data, stop) = (s.logs.clone(), s.data.clone(), Arc::clone(&stop));
        let wseed = rng.u64(..);
        std::thread::spawn(move || crash_loop_writer(&logs, &data, wseed, &stop))
    };
    let mut c = Some(c);
    let started = Instant::now();
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.u64(100..2500)));
        if let Some(c) = c.take() {
            c.kill();
        }
        eprintln!("crash_loop: SIGKILL {} of {kills}", k + 1);
        // Sometimes stay down a while: the writer rotates files the collector does not see.
        if rng.bool() {
            std::thread::sleep(Duration::from_millis(rng.u64(0..800)));
        }
        assert!(!writer.is_finished(), "the writer stopped early");
        c = Some(Collector::start(&cfg, s.port));
    }
    stop.store(true, Ordering::Relaxed);
    let (lines, renames, truncations) = writer.join().expect("writer");
    let c = c.expect("a collector runs");
    let written = all_lines(&s.logs);
    let got = wait_sink(&s, written.len(), Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(500));
    let log = c.log_text();
    assert_eq!(c.stop(), 0, "last run exits 0; log:\n{log}");
    eprintln!(
        "crash_loop: {kills} SIGKILLs in {:.0?}, {lines} lines into 200 files, {renames} rename \
         rotations, {truncations} copytruncates; sink {got}",
        started.elapsed()
    );
    assert_eq!(written.len() as u64, lines, "every line written is on disk");
    assert!(renames > 0 && truncations > 0, "both kinds of rotation ran");
    let messages: Vec<String> = s.sink().into_iter().map(|e| e.message).collect();
    assert_same_lines(&messages, &written);
}

/// A config for a second instance on the same `data_dir` and sink, with its own metrics port.
fn twin_config(s: &Setup, cfg: &Path) -> (PathBuf, u16) {
    let port_b = voltail_tests::free_port();
    let text = std::fs::read_to_string(cfg)
        .expect("cfg")
        .replace(&format!(":{}\"", s.port), &format!(":{port_b}\""));
    let cfg_b = s.tmp.path().join("twin.toml");
    std::fs::write(&cfg_b, text).expect("cfg b");
    (cfg_b, port_b)
}

/// Samples both instances' `/ready` for `d`; panics if both are ever ready in one sample.
/// Returns how many samples saw one of them ready.
fn never_both_ready(a: &Collector, b: &Collector, d: Duration, round: usize) -> usize {
    let end = Instant::now() + d;
    let mut ready = 0;
    while Instant::now() < end {
        let ra = http_status(a.port, "/ready") == Some(200);
        let rb = http_status(b.port, "/ready") == Some(200);
        // Both answered 200 one after the other: check A again, in case it just went away.
        let still_a = ra && rb && http_status(a.port, "/ready") == Some(200);
        assert!(
            !still_a,
            "round {round}: both instances ready at once; A:\n{}\nB:\n{}",
            a.log_text(),
            b.log_text()
        );
        ready += usize::from(ra || rb);
        std::thread::sleep(Duration::from_millis(10));
    }
    ready
}

#[test]
fn two_instances_started_at_once_never_both_ship() {
    let seed = seed("two_instances");
    let rounds = if long() { 100 } else { 20 };
    let mut rng = fastrand::Rng::with_seed(seed);
    let s = Setup::new();
    let _guard = SeedOnFailure("two_instances", seed, Some(s.tmp.path().to_path_buf()));
    let cfg = s.config("", "segment_max_bytes = 262144");
    let (cfg_b, port_b) = twin_config(&s, &cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (logs, stop) = (s.logs.clone(), Arc::clone(&stop));
        let seed = rng.u64(..);
        std::thread::spawn(move || {
            let o = GenerateOptions {
                dir: logs,
                pod_dir: None,
                pods: 8,
                rate: 200,
                lines: 0,
                app: "nginx".into(),
                file: "access.log".into(),
                rotate_bytes: 0,
                seed,
            };
            generate::run(&o, &stop).expect("generate")
        })
    };
    let mut ready_rounds = 0;
    for round in 0..rounds {
        let (a, b) = if rng.bool() {
            let a = Collector::start(&cfg, s.port);
            (a, Collector::start(&cfg_b, port_b))
        } else {
            let b = Collector::start(&cfg_b, port_b);
            (Collector::start(&cfg, s.port), b)
        };
        let mut seen = never_both_ready(&a, &b, Duration::from_millis(700), round);
        // One goes away (SIGKILL or SIGTERM), the other may take over meanwhile.
        let (gone, stays) = if rng.bool() { (a, b) } else { (b, a) };
        let (gone_port, stays_port) = (gone.port, stays.port);
        if rng.bool() {
            gone.kill();
        } else {
            assert_eq!(gone.stop(), 0, "SIGTERM exits 0");
        }
        let end = Instant::now() + Duration::from_millis(500);
        while Instant::now() < end {
            // `gone` is gone; a port reuse race is impossible: ports are fixed per config.
            assert_ne!(http_status(gone_port, "/ready"), Some(200));
            seen += usize::from(http_status(stays_port, "/ready") == Some(200));
            std::thread::sleep(Duration::from_millis(10));
        }
        ready_rounds += usize::from(seen > 0);
        if rng.bool() {
            stays.kill();
        } else {
            assert_eq!(stays.stop(), 0, "SIGTERM exits 0");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let lines = writer.join().expect("writer");
    assert!(
        ready_rounds > rounds / 2,
        "an instance got ready in only {ready_rounds} of {rounds} rounds"
    );
    let c = Collector::start(&cfg, s.port);
    let got = wait_sink(&s, lines as usize, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.stop(), 0);
    eprintln!("two_instances: {rounds} rounds, {lines} lines, sink {got}");
    assert_eq!(
        assert_exactly_once(&s.sink(), &log_files(&s.logs)),
        lines as usize
    );
}

/// Rewrites the device number of every entry in the checkpoint in `data`, as a checkpoint
/// copied from a machine where the volume is mounted under another device would have.
fn rewrite_devices(data: &Path, dev: u64) -> usize {
    let (mut store, loaded) = checkpoint::Store::open(data).expect("open checkpoint");
    assert!(
        matches!(loaded.outcome, checkpoint::LoadOutcome::Clean { .. }),
        "{:?}",
        loaded.outcome
    );
    let mut state = checkpoint::State::default();
    for (i, e) in loaded.entries.iter().enumerate() {
        let mut e = e.clone();
        assert_ne!(e.id.dev, dev);
        e.id.dev = dev;
        state.entries.insert(i as u64, e);
    }
    state.cursor = loaded.cursor.clone().unwrap_or_default();
    store.write(&state).expect("write checkpoint");
    loaded.entries.len()
}

#[test]
fn checkpoint_from_another_machine_does_not_reread_everything() {
    let s = Setup::new();
    gen(&s.logs, 6, 3_000, 11);
    let cfg = s.config("", "");
    let c = Collector::start(&cfg, s.port);
    assert!(
        c.wait_lines(18_000, Duration::from_secs(60)),
        "{}",
        c.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.stop(), 0);
    assert_eq!(s.sink().len(), 18_000);
    // Another machine: other device numbers (major 253, minor 7), same inodes and bytes.
    let n = rewrite_devices(&s.data, libc::makedev(253, 7));
    assert_eq!(n, 6, "six files tracked");
    gen(&s.logs, 6, 1_000, 12);
    let c = Collector::start(&cfg, s.port);
    assert!(
        c.wait_lines(6_000, Duration::from_secs(60)),
        "{}",
        c.log_text()
    );
    std::thread::sleep(Duration::from_millis(800));
    let read = c.metric("voltail_read_lines_total");
    let log = c.log_text();
    assert_eq!(c.stop(), 0);
    assert_eq!(
        read,
        Some(6_000.0),
        "only the new lines are read; log:\n{log}"
    );
    assert_eq!(assert_exactly_once(&s.sink(), &log_files(&s.logs)), 24_000);
}

/// Runs `mount args...`; Err(stderr) when it fails.
fn mount(args: &[&str]) -> Result<(), String> {
    let out = Command::new("mount")
        .args(args)
        .output()
        .expect("run mount");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// A tmpfs mounted for one test, lazily unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mkdir mount point");
        let p = at.to_str().expect("utf-8 path");
        mount(&["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", p]).expect("mount tmpfs");
        Tmpfs(at.to_path_buf())
    }
    fn remount(&self, opts: &str) -> Result<(), String> {
        mount(&[
            "-o",
            &format!("remount,{opts}"),
            self.0.to_str().expect("utf-8"),
        ])
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Whether this process may mount (root); `None` with the reason to skip otherwise.
fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(!must_run(), "CI=true: this test must run, as root");
        eprintln!("SKIPPED: mounting a tmpfs needs root (run as root, or with CI=true as root)");
    }
    root
}

/// Waits until `pred(metric)` holds, or panics with the log.
fn wait_metric(c: &Collector, name: &str, what: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = c.metric(name).filter(|v| pred(*v)) {
            return v;
        }
        assert!(
            Instant::now() < end,
            "{what}: {name} = {:?}; log:\n{}",
            c.metric(name),
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn full_then_read_only_disk_stops_loudly_and_recovers_exactly_once() {
    if !can_mount() {
        return;
    }
    let mut s = Setup::new();
    let disk = Tmpfs::mount(&s.tmp.path().join("disk"), "2m");
    s.data = disk.0.join("data");
    s.out = disk.0.join("out");
    // Uncompressed, so that 2 MiB fill up fast.
    let cfg = s.config("", "compression = \"none\"\nsegment_max_bytes = 262144");
    gen(&s.logs, 4, 5_000, 21); // about 4 MiB
    let mut c = Collector::start(&cfg, s.port);
    assert!(c.wait_up(Duration::from_secs(30)), "{}", c.log_text());

    // Full: the sink fails, nothing more is acknowledged, the process stays up. The
    // checkpoint's age does not show this (it measures how far the checkpoint trails what was
    // delivered, and nothing is delivered): the lag and the sink errors do.
    wait_metric(
        &c,
        "voltail_sink_errors_total",
        "the sink reports ENOSPC",
        |v| v > 0.0,
    );
    let errors = c.metric("voltail_sink_errors_total").unwrap_or(0.0);
    // Batches delivered before the first error may still be checkpointed: sample after that.
    let errors = wait_metric(&c, "voltail_sink_errors_total", "retrying", |v| {
        v >= errors + 2.0
    });
    let ck = checkpoint::read_only(&s.data).expect("checkpoint readable");
    wait_metric(&c, "voltail_sink_errors_total", "still retrying", |v| {
        v >= errors + 1.0
    });
    let lag = wait_metric(&c, "voltail_lag_bytes", "lag shows the stall", |v| v > 0.0);
    let ck2 = checkpoint::read_only(&s.data).expect("checkpoint readable");
    assert!(
        matches!(ck2.outcome, checkpoint::LoadOutcome::Clean { .. }),
        "no torn checkpoint on a full disk: {:?}",
        ck2.outcome
    );
    assert_eq!(
        ck.generation, ck2.generation,
        "the checkpoint stopped advancing"
    );
    assert_eq!(ck.entries, ck2.entries, "no offset moved");
    assert!(
        c.child.try_wait().expect("try_wait").is_none(),
        "still running"
    );
    assert_eq!(http_status(s.port, "/health"), Some(200));
    let log = c.log_text();
    assert!(
        log.contains("No space left on device") && log.contains("WARN"),
        "the full disk is in the log:\n{log}"
    );
    let shipped = s.sink().len();
    assert!(
        shipped < 20_000,
        "the disk filled up before everything was shipped ({shipped})"
    );
    eprintln!(
        "disk full: {shipped} of 20000 lines shipped, lag {lag} B, checkpoint generation {}",
        ck2.generation
    );

    // Space returns: everything is shipped, once.
    disk.remount("size=64m").expect("enlarge");
    let got = wait_sink(&s, 20_000, Duration::from_secs(90));
    assert_eq!(got, 20_000, "recovered; log:\n{}", c.log_text());
    wait_metric(&c, "voltail_lag_bytes", "lag falls back to 0", |v| v == 0.0);
    // Read-only: the kernel refuses a live remount while voltail holds files open for writing
    // (EBUSY), so the volume goes read-only under a crashed collector, which then starts on
    // it: a start-up error (the data_dir lock cannot be written), loud, with a non-zero exit.
    let busy = disk.remount("ro");
    assert!(
        busy.is_err(),
        "a live read-only remount is refused: {busy:?}"
    );
    c.kill();
    disk.remount("ro").expect("remount ro");
    gen(&s.logs, 4, 6_000, 22); // 6,000 more lines per pod: 44,000 in all
    let mut ro = Collector::start(&cfg, s.port);
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = ro.child.try_wait().expect("try_wait") {
            break st;
        }
        assert!(
            Instant::now() < end,
            "still running on a read-only data_dir: {}",
            ro.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = ro.log_text();
    assert_ne!(status.code(), Some(0), "{log}");
    assert!(
        log.contains("voltail.lock") && log.contains("Read-only file system"),
        "{log}"
    );
    assert_eq!(s.sink().len(), 20_000, "nothing shipped, nothing lost");
    disk.remount("rw").expect("rw");
    ro.kill();
    c = Collector::start(&cfg, s.port);
    let got = wait_sink(&s, 44_000, Duration::from_secs(90));
    assert_eq!(
        got,
        44_000,
        "recovered from read-only; log:\n{}",
        c.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.stop(), 0);
    let l = checkpoint::read_only(&s.data).expect("checkpoint");
    assert!(
        matches!(l.outcome, checkpoint::LoadOutcome::Clean { .. }),
        "{:?}",
        l.outcome
    );
    assert_eq!(assert_exactly_once(&s.sink(), &log_files(&s.logs)), 44_000);
}

/// Regression: SIGKILL after the first batches were shipped but before the first checkpoint
/// holding the sink's cursor repeated them all (the restart found no cursor, kept the segment
/// and read every file again). Found by the crash loop.
#[test]
fn sigkill_before_the_first_checkpoint_repeats_nothing() {
    let s = Setup::new();
    gen(&s.logs, 4, 2_000, 31);
    // No periodic checkpoint during the first run: only what start-up writes.
    let slow = s.config("", "");
    let text = std::fs::read_to_string(&slow).expect("cfg").replace(
        "checkpoint_interval = \"200ms\"",
        "checkpoint_interval = \"10m\"",
    );
    let slow = s.tmp.path().join("slow.toml");
    std::fs::write(&slow, text).expect("cfg");
    let c = Collector::start(&slow, s.port);
    assert!(
        c.wait_lines(8_000, Duration::from_secs(60)),
        "{}",
        c.log_text()
    );
    assert_eq!(
        wait_sink(&s, 8_000, Duration::from_secs(30)),
        8_000,
        "shipped"
    );
    c.kill();
    let c = Collector::start(&s.config("", ""), s.port);
    assert!(
        c.wait_lines(8_000, Duration::from_secs(60)),
        "{}",
        c.log_text()
    );
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(c.stop(), 0);
    assert_eq!(assert_exactly_once(&s.sink(), &log_files(&s.logs)), 8_000);
}

// ---- filesystem errors through the slow-NAS stand-in ----

/// Whether this process may mount FUSE (root and /dev/fuse); skips with a printed reason
/// otherwise, and fails under `CI=true`.
fn can_mount_fuse() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root && Path::new("/dev/fuse").exists();
    if !ok {
        assert!(
            !must_run(),
            "CI=true: this test must run, as root with /dev/fuse"
        );
        eprintln!("SKIPPED: mounting the FUSE stand-in needs root and /dev/fuse");
    }
    ok
}

/// One pod writing through the mount.
struct FusePod {
    /// Relative to the mount root, as faults name it.
    rel: PathBuf,
    file: File,
    written: u64,
}

/// Lines a pod's writer appends: unique, and long enough that a read spans several.
fn fuse_line(pod: usize, seq: u64) -> String {
    format!("pod-{pod} seq {seq:08} GET /api/v1/items?page={seq} HTTP/1.1 200 512 \"-\" \"test\"\n")
}

/// Counts the sink's events per pod directory (by the `pod-N` in the path).
fn per_pod(s: &Setup, pods: usize) -> Vec<usize> {
    let mut n = vec![0; pods];
    for e in s.sink() {
        if let Some(i) = (0..pods).find(|i| e.file.contains(&format!("_pod-{i}_"))) {
            n[i] += 1;
        }
    }
    n
}

/// The `count` of warnings whose message contains `what` in a collector's log.
fn warnings(log: &str, what: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("WARN") && l.contains(what))
        .count()
}

fn fs_faults_on(reader: &str) {
    use xtask::slownas::faults::{Fault, Op};
    use xtask::slownas::{Options, SlowNas};
    let test = "filesystem_errors";
    let seed = seed(test);
    let mut rng = fastrand::Rng::with_seed(seed);
    let s = Setup::new();
    let _guard = SeedOnFailure(test, seed, Some(s.tmp.path().to_path_buf()));
    let src = s.tmp.path().join("nas");
    std::fs::create_dir_all(&src).expect("mkdir source");
    // direct_io: every read reaches the filesystem (and its faults), as on NFS without cache.
    let nas = SlowNas::mount(
        &src,
        &s.logs,
        Options {
            latency: Duration::from_millis(1),
            threads: 16,
            entry_ttl: Duration::from_millis(200),
            direct_io: true,
        },
    )
    .expect("mount the slow-NAS stand-in");
    let faults = Arc::clone(nas.faults());

    // Pods 0-1: EIO (reads; stats too for 1). 2-3: ESTALE (stats, opens and reads; reads only
    // for 3). 4: its directory vanishes while it writes on; 5: vanishes while it is quiet,
    // for longer than rotate_wait. 6-7: healthy, they must keep flowing meanwhile.
    const PODS: usize = 8;
    let mut pods: Vec<FusePod> = (0..PODS)
        .map(|i| {
            let rel = PathBuf::from(format!("nginx/default_pod-{i}_10.0.0.{i}_10.1.0.1_node-a"));
            std::fs::create_dir_all(s.logs.join(&rel)).expect("mkdir through the mount");
            let file = open_append(&s.logs.join(&rel).join("access.log"));
            FusePod {
                rel,
                file,
                written: 0,
            }
        })
        .collect();
    let write = |pods: &mut [FusePod], which: &[usize], n: u64| {
        for &i in which {
            let p = &mut pods[i];
            let mut text = String::new();
            for _ in 0..n {
                text.push_str(&fuse_line(i, p.written));
                p.written += 1;
            }
            p.file
                .write_all(text.as_bytes())
                .expect("write through the mount");
        }
    };
    let all: Vec<usize> = (0..PODS).collect();
    write(&mut pods, &all, 50);

    let cfg = s.config("", "");
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, format!("reader = \"{reader}\"\n{text}")).expect("config");
    let c = Collector::start(&cfg, s.port);
    assert!(c.wait_up(Duration::from_secs(30)), "{}", c.log_text());
    assert!(
        c.wait_lines(50 * PODS as u64, Duration::from_secs(30)),
        "first lines not read; log:\n{}",
        c.log_text()
    );
    let errors_before = c.metric("voltail_read_errors_total").unwrap_or(0.0);

    let hold = Duration::from_millis(rng.u64(3_000..5_000));
    eprintln!("{test}: reader {reader}, faults held for {hold:?}");
    let ids = [
        faults.add(Fault::fail(&[Op::Read], &pods[0].rel, libc::EIO)),
        faults.add(Fault::fail(
            &[Op::Read, Op::Getattr],
            &pods[1].rel,
            libc::EIO,
        )),
        faults.add(Fault::fail(
            &[Op::Getattr, Op::Open, Op::Read],
            &pods[2].rel,
            libc::ESTALE,
        )),
        faults.add(Fault::fail(&[Op::Read], &pods[3].rel, libc::ESTALE)),
        faults.add(Fault::hide(&pods[4].rel)),
        faults.add(Fault::hide(&pods[5].rel)),
    ];
    // Let the kernel's cached names expire, and take stock.
    std::thread::sleep(Duration::from_millis(400));
    let at_start = per_pod(&s, PODS);
    let end = Instant::now() + hold;
    let writing: Vec<usize> = (0..PODS).filter(|&i| i != 5).collect();
    while Instant::now() < end {
        write(&mut pods, &writing, rng.u64(1..8));
        std::thread::sleep(Duration::from_millis(20));
    }
    // The healthy pods were shipped meanwhile, the faulty ones could not be (their lines
    // written during the faults stay behind), and the process is up and counting errors.
    let healthy_wait = Instant::now() + Duration::from_secs(20);
    loop {
        let now = per_pod(&s, PODS);
        // Pod 4's directory is gone by name, but its open descriptor still reads.
        if (4..PODS)
            .filter(|&i| i != 5)
            .all(|i| now[i] as u64 == pods[i].written)
        {
            for i in 0..4 {
                assert!(
                    (now[i] as u64) < pods[i].written,
                    "pod {i} was fully shipped while failing: {now:?}"
                );
            }
            break;
        }
        assert!(
            Instant::now() < healthy_wait,
            "healthy pods stalled behind the faulty ones: shipped {now:?} of {:?} (at the \
             start of the faults {at_start:?}); log:\n{}",
            pods.iter().map(|p| p.written).collect::<Vec<_>>(),
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(c.get("/health").is_some(), "the collector is up");
    let errors = c.metric("voltail_read_errors_total").unwrap_or(0.0) - errors_before;
    assert!(errors > 0.0, "read errors counted: {errors}");

    for id in ids {
        faults.lift(id);
    }
    let injected = faults.injected();
    // Everyone writes on, then stops; every line must arrive, once.
    for _ in 0..20 {
        write(&mut pods, &all, rng.u64(1..8));
        std::thread::sleep(Duration::from_millis(50));
    }
    let total: u64 = pods.iter().map(|p| p.written).sum();
    let got = wait_sink(&s, total as usize, Duration::from_secs(60));
    // A moment more, to see anything read twice arrive.
    std::thread::sleep(Duration::from_secs(2));
    let read_lines = c.metric("voltail_read_lines_total").unwrap_or(0.0) as u64;
    let log = c.log_text();
    assert_eq!(c.stop(), 0, "SIGTERM exits 0");
    let files: Vec<PathBuf> = pods
        .iter()
        .map(|p| s.logs.join(&p.rel).join("access.log"))
        .collect();
    let events = s.sink();
    eprintln!(
        "{test} ({reader}): {total} lines written, {got} shipped, {read_lines} read, {errors} \
         read errors counted, {injected} faults injected, warnings: {} read, {} stat, {} open",
        warnings(&log, "read failed"),
        warnings(&log, "cannot stat"),
        warnings(&log, "cannot open"),
    );
    let checked = assert_exactly_once(&events, &files);
    assert_eq!(checked as u64, total);
    assert_eq!(read_lines, total, "every line read once, none again");
    // Retried with backoff and logged the first few times, not 50 times a second.
    let logged = warnings(&log, "read failed") + warnings(&log, "cannot stat");
    assert!(
        logged <= 60,
        "{logged} warnings for 4 failing files in {hold:?}: the log is flooded"
    );
    assert!(!log.contains(" ERROR "), "no data put at risk; log:\n{log}");
    // The writers' descriptors first: a mount with files open only detaches.
    drop(pods);
    nas.unmount().expect("unmount the stand-in");
}

/// EIO and ESTALE on reads, stats and opens of some pods' files, and two pod directories
/// vanishing and coming back, through the FUSE stand-in: the other pods flow meanwhile, the
/// errors are counted, and at the end every line is in the sink exactly once, read once.
#[test]
fn filesystem_errors_and_a_vanishing_directory_lose_nothing() {
    if !can_mount_fuse() {
        return;
    }
    // The backend `reader = "auto"` picks on FUSE, then the other one.
    fs_faults_on("io_uring");
    fs_faults_on("pread");
}

// ---- clock jumps (libfaketime) ----

/// The libfaketime library to preload, or `None` (with the reason printed) when it is not
/// installed; under `CI=true` its absence fails the test (`tests/scripts/sink-deps.sh`
/// installs it).
fn libfaketime() -> Option<PathBuf> {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketime.so.1"))
        .chain([PathBuf::from("/usr/lib/faketime/libfaketime.so.1")])
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            !must_run(),
            "CI=true: the clock tests must run; install faketime (apt-get install faketime)"
        );
        eprintln!("SKIPPED: libfaketime is not installed (apt-get install faketime)");
    }
    found
}

/// SIGTERM, and the exit code if it exits within `within` (else SIGKILL and `None`).
fn stop_within(mut c: Collector, within: Duration) -> Option<i32> {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(c.child.id() as i32, libc::SIGTERM) };
    let end = Instant::now() + within;
    while Instant::now() < end {
        if let Ok(Some(st)) = c.child.try_wait() {
            return Some(st.code().unwrap_or(-1));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// CPU time (user + system) the process used so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the `(comm)` field: state is field 3; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// Pods write while the collector's clock jumps to each of `steps` (libfaketime offsets, held
/// for the given seconds): every line is shipped exactly once and read once (no re-read), and
/// the jumps are visible in the events' timestamps (so the fake clock did reach the
/// collector). `monotonic`: libfaketime fakes `CLOCK_MONOTONIC` too.
fn clock_jumps(lib: &Path, monotonic: bool, steps: &[(&str, u64)]) {
    let test = if monotonic {
        "clock_jumps_monotonic"
    } else {
        "clock_jumps_realtime"
    };
    let seed = seed(test);
    let s = Setup::new();
    let _guard = SeedOnFailure(test, seed, Some(s.tmp.path().to_path_buf()));
    let clock = s.tmp.path().join("faketime");
    std::fs::write(&clock, "+0\n").expect("write clock");
    let (lib, clock_s) = (lib.display().to_string(), clock.display().to_string());
    let mut env = vec![
        ("LD_PRELOAD", lib.as_str()),
        ("FAKETIME_TIMESTAMP_FILE", clock_s.as_str()),
        // Re-read the file at every clock call: the jump happens at once.
        ("FAKETIME_NO_CACHE", "1"),
    ];
    if !monotonic {
        env.push(("FAKETIME_DONT_FAKE_MONOTONIC", "1"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (logs, stop) = (s.logs.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let o = GenerateOptions {
                dir: logs,
                pod_dir: None,
                pods: 8,
                rate: 200,
                lines: 0,
                app: "nginx".into(),
                file: "access.log".into(),
                rotate_bytes: 0,
                seed,
            };
            generate::run(&o, &stop).expect("generate")
        })
    };
    let cfg = s.config("", "");
    let c = Collector::start_env(&cfg, s.port, &env);
    assert!(c.wait_up(Duration::from_secs(30)), "{}", c.log_text());
    let t0 = Instant::now();
    let cpu0 = cpu_ticks(c.child.id());
    let mut phases = Vec::new();
    for &(offset, secs) in steps {
        std::fs::write(&clock, format!("{offset}\n")).expect("write clock");
        let lines0 = c.metric("voltail_read_lines_total").unwrap_or(0.0);
        let cpu = cpu_ticks(c.child.id());
        std::thread::sleep(Duration::from_secs(secs));
        let lines = c.metric("voltail_read_lines_total").unwrap_or(0.0) - lines0;
        let cpu = cpu_ticks(c.child.id()) - cpu;
        phases.push(format!(
            "{offset}: {lines} lines read in {secs} s, {cpu} CPU ticks"
        ));
    }
    stop.store(true, Ordering::SeqCst);
    let total = writer.join().expect("writer");
    let got = wait_sink(&s, total as usize, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    let read_lines = c.metric("voltail_read_lines_total").unwrap_or(0.0) as u64;
    let cpu = cpu_ticks(c.child.id()) - cpu0;
    let log = c.log_text();
    let code = stop_within(c, Duration::from_secs(30));
    let events = s.sink();
    // The first event was stamped before any jump: its date is today (real time).
    let today = events.first().map(|e| e.timestamp[..10].to_string());
    let today = today.expect("some events");
    let future = events.iter().filter(|e| e.timestamp[..10] > *today).count();
    let past = events.iter().filter(|e| e.timestamp[..10] < *today).count();
    eprintln!(
        "{test}: {total} lines written, {got} shipped, {read_lines} read; stamped in the \
         future {future}, in the past {past}; {cpu} CPU ticks in {:.1} s; {}",
        t0.elapsed().as_secs_f64(),
        phases.join("; ")
    );
    assert_eq!(code, Some(0), "SIGTERM exits 0 within 30 s; log:\n{log}");
    let checked = assert_exactly_once(&events, &log_files(&s.logs));
    assert_eq!(checked as u64, total);
    assert_eq!(
        read_lines, total,
        "every line read once: no re-read after a jump"
    );
    let back = steps.iter().any(|(o, _)| o.starts_with('-'));
    assert!(
        future > 0 && (past > 0 || !back),
        "the jumps reached the collector: {future} events stamped after today, {past} before"
    );
    assert!(!log.contains(" ERROR "), "log:\n{log}");
}

/// The wall clock jumps a day forward, two days back, and forward again (an NTP step, a VM
/// restored from a snapshot); the monotonic clock does not, as on a real kernel.
#[test]
fn wall_clock_jumps_forward_and_back_lose_nothing() {
    let Some(lib) = libfaketime() else { return };
    clock_jumps(&lib, false, &[("+0", 3), ("+1d", 4), ("-1d", 4), ("+0", 3)]);
}

/// Both clocks jump forward, a day and then another: every deadline the collector holds
/// (polls, linger, checkpoint, rotate_wait) falls due at once. Forward only: a kernel never
/// moves `CLOCK_MONOTONIC` back, and under libfaketime a backward jump leaves every deadline
/// days away, so the collector waits for the clock to catch up (docs/reliability.md).
#[test]
fn monotonic_clock_jumps_forward_lose_nothing() {
    let Some(lib) = libfaketime() else { return };
    clock_jumps(&lib, true, &[("+0", 3), ("+1d", 4), ("+2d", 4)]);
}
