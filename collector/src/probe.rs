//! The eBPF write probe in the daemon: loads it according to `probe = "auto" | "on" | "off"` and,
//! on its own thread (`voltail-probe`), turns its write events into [`Hint::Write`]s for the
//! tailer.
//!
//! [`spawn`] is the whole interface; [`ProbeHandle`] owns the drain thread. The kernel side and
//! the loader live in the `voltail-ebpf` crate.
//!
//! What it deliberately does not do: decide what a hint means (the tailer makes the file due, or
//! discovers an unknown inode's directory), or wait when the tailer is busy: a full hint mailbox
//! ([`crate::tail::hints`]) drops the hint, because the safety poll catches up anyway. Each
//! drained batch is posted at once, one hint per file, so a writer doing many small writes does
//! not flood the mailbox.
//!
//! With writer tags on (`probe_writer_tags`), each hint also names the file's last writer in
//! that batch: its cgroup id resolved to a path by [`crate::cgroup::CgroupPaths`] (cached, on
//! this thread, so a walk of the cgroup tree never stalls the reader).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use voltail_ebpf::{Attach, Probe, ProbeOptions};

use crate::cgroup::CgroupPaths;
use crate::config::ProbeMode;
use crate::tail::hints::HintSender;
use crate::tail::Hint;
use crate::FastMap;

pub use voltail_ebpf::ProbeError;

/// How long one wait on the ring buffer lasts; bounds how late the thread sees `stop`.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// How often the kernel's drop counters are read.
const LOST_EVERY: Duration = Duration::from_secs(1);

/// The running probe: owns the drain thread. [`ProbeHandle::stop`] ends and joins it; dropping
/// the handle does the same.
#[derive(Debug)]
pub struct ProbeHandle {
    thread: Option<JoinHandle<()>>,
    /// Stops this thread only; the daemon-wide flag given to [`spawn`] stops it too.
    own_stop: Arc<AtomicBool>,
    /// New watched-device sets for the drain thread, which owns the probe.
    devices: Sender<Vec<u64>>,
    attach: Attach,
}

impl ProbeHandle {
    /// Stops the drain thread and waits for it; the probe is detached when the thread ends.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Replaces the watched devices (`st_dev` values), e.g. when a root is mounted after
    /// start-up. Applied by the drain thread within one poll (~100 ms); a failure is logged there.
    pub fn set_devices(&self, devices: Vec<u64>) {
        // A send fails only when the thread has ended, and then there is nothing to update.
        let _ = self.devices.send(devices);
    }

    /// Whether the probe runs on the per-syscall tracepoints or on the `tp_btf` fallback.
    pub fn attach_kind(&self) -> Attach {
        self.attach
    }

    fn shutdown(&mut self) {
        self.own_stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("probe drain thread panicked");
            }
        }
    }
}

impl Drop for ProbeHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts the probe for the watched `devices` (`st_dev` values of the watched mounts).
///
/// With `writer_tags`, hints carry the writer's cgroup (see the module docs).
///
/// `Off` returns `Ok(None)` without trying. `Auto` returns `Ok(None)` with one `warn` line naming
/// why when the probe cannot run. `On` returns that error, which fails start-up. The drain thread
/// runs until `stop` is set or [`ProbeHandle::stop`] is called.
pub fn spawn(
    mode: ProbeMode,
    devices: Vec<u64>,
    writer_tags: bool,
    batch_window: Duration,
    hints: HintSender,
    stop: Arc<AtomicBool>,
) -> Result<Option<ProbeHandle>, ProbeError> {
    if mode == ProbeMode::Off {
        events::active(false);
        return Ok(None);
    }
    let opts = ProbeOptions {
        devices,
        ignore_pid: std::process::id(),
        batch_window,
        ..ProbeOptions::default()
    };
    let started = Probe::load(&opts).and_then(|probe| {
        let attach = probe.attach_kind();
        let own_stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&own_stop);
        let (devices_tx, devices_rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("voltail-probe".to_string())
            .spawn(move || {
                let cgroups = writer_tags.then(CgroupPaths::new);
                drain(probe, cgroups, &hints, &devices_rx, &stop, &thread_stop)
            })
            .map_err(ProbeError::Thread)?;
        Ok(ProbeHandle {
            thread: Some(thread),
            own_stop,
            devices: devices_tx,
            attach,
        })
    });
    match started {
        Ok(handle) => {
            tracing::info!(
                attach = ?handle.attach,
                devices = opts.devices.len(),
                "ebpf write probe running"
            );
            events::active(true);
            Ok(Some(handle))
        }
        Err(e) if mode == ProbeMode::Auto => {
            tracing::warn!(
                reason = why(&e),
                error = %voltail_ebpf::error_chain(&e),
                "ebpf write probe unavailable, polling only"
            );
            events::active(false);
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The drain loop: wait, coalesce per file, hint, repeat until stopped.
fn drain(
    mut probe: Probe,
    mut cgroups: Option<CgroupPaths>,
    hints: &HintSender,
    devices: &Receiver<Vec<u64>>,
    stop: &AtomicBool,
    own_stop: &AtomicBool,
) {
    let mut batch = Vec::with_capacity(4096);
    // Per file of a batch: the cgroup id of its last event (0 without writer tags), in the
    // order the files first appear.
    let mut files: Vec<((u64, u64), (u64, u64))> = Vec::new();
    let mut index: FastMap<(u64, u64), usize> = FastMap::default();
    let mut failing = false;
    let mut lost_read_at = Instant::now();
    let metrics = crate::metrics::Events::new();
    while !stop.load(Ordering::Relaxed) && !own_stop.load(Ordering::Relaxed) {
        if let Some(set) = devices.try_iter().last() {
            match probe.set_devices(&set) {
                Ok(()) => tracing::info!(devices = set.len(), "probe watched devices updated"),
                Err(e) => {
                    tracing::warn!(error = %voltail_ebpf::error_chain(&e), "updating the probe's watched devices failed")
                }
            }
        }
        for m in hints.take_mutes() {
            if let Err(e) = probe.mute(m.dev, m.ino, m.span) {
                tracing::debug!(error = %voltail_ebpf::error_chain(&e), dev = m.dev, ino = m.ino,
                    "muting an inode in the probe failed; its writes keep coming as hints");
            }
        }
        batch.clear();
        if let Err(e) = probe.poll(POLL_TIMEOUT, &mut batch) {
            // Log a run of failures once; sleep so a persistent one does not spin.
            if !failing {
                tracing::warn!(error = %voltail_ebpf::error_chain(&e), "ebpf probe poll failed");
                failing = true;
            }
            std::thread::sleep(POLL_TIMEOUT);
            continue;
        }
        failing = false;
        if !batch.is_empty() {
            events::events(batch.len() as u64);
            files.clear();
            index.clear();
            for event in &batch {
                let cgroup = if cgroups.is_some() {
                    event.cgroup_id
                } else {
                    0
                };
                let file = (event.dev, event.ino);
                match index.get(&file) {
                    Some(&i) => files[i].1 = (cgroup, event.dir_ino),
                    None => {
                        index.insert(file, files.len());
                        files.push((file, (cgroup, event.dir_ino)));
                    }
                }
            }
            let batch = files
                .iter()
                .map(|&((dev, ino), (cgroup, dir))| Hint::Write {
                    dev,
                    ino,
                    dir,
                    writer: cgroups.as_mut().and_then(|c| c.resolve(cgroup)),
                });
            let Ok(dropped) = hints.send(batch) else {
                tracing::debug!("hint receiver gone, probe drain stops");
                events::active(false);
                return;
            };
            if dropped > 0 {
                tracing::trace!(dropped, "hint mailbox full, hints dropped");
                for _ in 0..dropped {
                    metrics.hint_dropped();
                }
            }
        }
        if lost_read_at.elapsed() >= LOST_EVERY {
            lost_read_at = Instant::now();
            match probe.lost() {
                Ok(lost) => events::lost(lost),
                Err(e) => {
                    tracing::debug!(error = %voltail_ebpf::error_chain(&e), "reading probe drop counters failed")
                }
            }
        }
    }
    if let Ok(lost) = probe.lost() {
        events::lost(lost);
    }
    events::active(false);
}

/// A short, stable name for why the probe cannot run, for the one `warn` line of `auto`.
fn why(e: &ProbeError) -> &'static str {
    match e {
        ProbeError::NotCompiledIn => "not compiled in",
        ProbeError::NoPrivilege(_) => "no privilege",
        ProbeError::NoBtf { .. } => "no btf",
        ProbeError::NoTracefs(_) => "no tracefs",
        ProbeError::Load { .. } => "load error",
        ProbeError::Attach { .. } => "attach error",
        ProbeError::Map { .. } => "map error",
        ProbeError::Thread(_) => "thread error",
    }
}

// ---- Metrics. Kept together so they can move into the metrics module's events interface. ----
// `voltail_probe_wakeups_total` (reads the probe triggered) is counted by the tailer, and
// `voltail_probe_hints_dropped_total` already goes through `metrics::Events::hint_dropped`.
mod events {
    /// `voltail_probe_active`: 1 while the probe runs.
    pub(super) fn active(on: bool) {
        metrics::gauge!("voltail_probe_active").set(if on { 1.0 } else { 0.0 });
    }

    /// `voltail_probe_events_total`: write events drained from the ring buffer.
    pub(super) fn events(n: u64) {
        metrics::counter!("voltail_probe_events_total").increment(n);
    }

    /// `voltail_probe_lost_total`: events the kernel dropped because the ring buffer was full.
    pub(super) fn lost(total: u64) {
        metrics::counter!("voltail_probe_lost_total").absolute(total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    const WINDOW: Duration = voltail_ebpf::DEFAULT_BATCH_WINDOW;

    /// `Some(())` when the probe can run here; otherwise prints why, or panics under `CI=true`.
    fn can_test(test: &str) -> Option<()> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let reason = if !voltail_ebpf::COMPILED_IN {
            "the probe is compiled out (no clang at build time)"
        } else if !root {
            "not running as root"
        } else {
            return Some(());
        };
        let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(!in_ci, "{test}: cannot run under CI=true: {reason}");
        let _ = writeln!(std::io::stderr(), "skipping {test}: {reason}");
        None
    }

    /// Appends `text` (a `printf` format) to `path` from a `sh` child: a writer that is not
    /// this process.
    fn sh_append(path: &std::path::Path, text: &str) {
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!("printf {text} >> '{}'", path.display()))
            .status()
            .expect("sh");
        assert!(st.success());
    }

    #[test]
    fn off_does_not_load() {
        let (tx, _rx) = crate::tail::hints::mailbox(1);
        let stop = Arc::new(AtomicBool::new(false));
        let handle =
            spawn(ProbeMode::Off, vec![1], false, WINDOW, tx, stop).expect("off never fails");
        assert!(handle.is_none());
    }

    #[test]
    fn on_without_the_object_fails_and_auto_falls_back() {
        if voltail_ebpf::COMPILED_IN {
            return;
        }
        let (tx, _rx) = crate::tail::hints::mailbox(1);
        let stop = Arc::new(AtomicBool::new(false));
        let err = spawn(
            ProbeMode::On,
            vec![],
            false,
            WINDOW,
            tx.clone(),
            Arc::clone(&stop),
        )
        .expect_err("on must fail without the object");
        assert!(matches!(err, ProbeError::NotCompiledIn));
        assert!(spawn(ProbeMode::Auto, vec![], false, WINDOW, tx, stop)
            .expect("auto falls back")
            .is_none());
    }

    #[test]
    fn a_local_write_becomes_a_hint() {
        if can_test("a_local_write_becomes_a_hint").is_none() {
            return;
        }
        // tmpfs: a device of its own, so unrelated writes (builds, other tests) do not flood the probe.
        let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir");
        let path = dir.path().join("pod.log");
        std::fs::write(&path, b"").expect("create");
        let meta = std::fs::metadata(&path).expect("stat");
        let (tx, rx) = crate::tail::hints::mailbox(1024);
        let stop = Arc::new(AtomicBool::new(false));
        let handle = spawn(
            ProbeMode::On,
            vec![meta.dev()],
            false,
            WINDOW,
            tx,
            Arc::clone(&stop),
        )
        .expect("probe on")
        .expect("a handle when on");

        sh_append(&path, "'line\\n'");
        let want = Hint::Write {
            dev: meta.dev(),
            ino: meta.ino(),
            dir: std::fs::metadata(dir.path()).expect("stat dir").ino(),
            writer: None,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut got = false;
        let mut hints = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            rx.wait(left, &mut hints);
            if hints.drain(..).any(|h| h == want) {
                got = true;
                break;
            }
        }
        assert!(got, "no hint {want:?} within 15 s");

        let started = Instant::now();
        handle.stop();
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "stop took {:?}",
            started.elapsed()
        );
        assert!(
            !stop.load(Ordering::Relaxed),
            "stop() must not stop the daemon"
        );
    }

    #[test]
    fn set_devices_starts_hints_for_a_device_added_later() {
        if can_test("set_devices_starts_hints_for_a_device_added_later").is_none() {
            return;
        }
        // tmpfs: a device of its own, so unrelated writes (builds, other tests) do not flood the probe.
        let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir");
        let path = dir.path().join("late.log");
        std::fs::write(&path, b"").expect("create");
        let meta = std::fs::metadata(&path).expect("stat");
        let (tx, rx) = crate::tail::hints::mailbox(1024);
        let stop = Arc::new(AtomicBool::new(false));
        let handle = spawn(ProbeMode::On, vec![], false, WINDOW, tx, stop)
            .expect("probe on")
            .expect("a handle when on");
        handle.set_devices(vec![meta.dev()]);
        let want = Hint::Write {
            dev: meta.dev(),
            ino: meta.ino(),
            dir: std::fs::metadata(dir.path()).expect("stat dir").ino(),
            writer: None,
        };
        // The update lands within one poll; write until a hint arrives.
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut got = false;
        while !got && Instant::now() < deadline {
            sh_append(&path, "'x\\n'");
            // Other processes write to the same device: look through every hint that comes.
            let mut hints = Vec::new();
            rx.wait(Duration::from_millis(200), &mut hints);
            got = hints.contains(&want);
        }
        assert!(got, "no hint after the device was added");
        handle.stop();
    }

    /// A mute the reader posts reaches the kernel through the drain thread: the muted file's
    /// writes bring no hint, another file's do.
    #[test]
    fn a_mute_posted_by_the_reader_silences_that_file_in_the_kernel() {
        if can_test("a_mute_posted_by_the_reader_silences_that_file_in_the_kernel").is_none() {
            return;
        }
        let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir");
        let (muted, other) = (dir.path().join("debug.txt"), dir.path().join("app.log"));
        for p in [&muted, &other] {
            std::fs::write(p, b"").expect("create");
        }
        let (m, o) = (
            std::fs::metadata(&muted).expect("stat"),
            std::fs::metadata(&other).expect("stat"),
        );
        let (tx, rx) = crate::tail::hints::mailbox(1024);
        let stop = Arc::new(AtomicBool::new(false));
        let handle = spawn(ProbeMode::On, vec![m.dev()], false, WINDOW, tx, stop)
            .expect("probe on")
            .expect("a handle when on");
        rx.mute([crate::tail::hints::Mute {
            dev: m.dev(),
            ino: m.ino(),
            span: Duration::from_secs(60),
        }]);
        // The drain thread applies mutes before each poll (at most ~100 ms apart).
        std::thread::sleep(Duration::from_millis(300));
        sh_append(&muted, "'x\\n'");
        sh_append(&other, "'x\\n'");
        let dir_ino = std::fs::metadata(dir.path()).expect("stat dir").ino();
        let hint = |meta: &std::fs::Metadata| Hint::Write {
            dev: meta.dev(),
            ino: meta.ino(),
            dir: dir_ino,
            writer: None,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut seen = Vec::new();
        while !seen.contains(&hint(&o)) && Instant::now() < deadline {
            rx.wait(Duration::from_millis(200), &mut seen);
        }
        assert!(seen.contains(&hint(&o)), "no hint for the file not muted");
        assert!(
            !seen.contains(&hint(&m)),
            "a hint for the muted file: {seen:?}"
        );
        handle.stop();
    }

    #[test]
    fn the_daemon_stop_flag_ends_the_thread() {
        if can_test("the_daemon_stop_flag_ends_the_thread").is_none() {
            return;
        }
        let (tx, _rx) = crate::tail::hints::mailbox(1);
        let stop = Arc::new(AtomicBool::new(false));
        let handle = spawn(
            ProbeMode::Auto,
            vec![],
            false,
            WINDOW,
            tx,
            Arc::clone(&stop),
        )
        .expect("auto never fails")
        .expect("probe runs as root with clang");
        stop.store(true, Ordering::Relaxed);
        let started = Instant::now();
        handle.stop();
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}
