//! The probe against the real kernel: child processes write real files and the events must come
//! back with the right device, inode, byte count and pid; writes that must be filtered are not.
//!
//! Needs root and a build with clang. Under `CI=true` a missing requirement fails the test;
//! elsewhere the test prints why it skips.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use voltail_ebpf::{Attach, Probe, ProbeOptions, WriteEvent, COMPILED_IN};

/// Environment variable that turns this test binary into the writer child (see `child_main`).
const CHILD_ENV: &str = "VOLTAIL_PROBE_TEST_CHILD";

/// Returns `Some(())` when the probe can be tested here; otherwise prints why (or panics in CI).
fn can_test(test: &str) -> Option<()> {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let reason = if !COMPILED_IN {
        "the probe is compiled out (no clang at build time)"
    } else if !root {
        "not running as root"
    } else {
        return Some(());
    };
    assert!(!in_ci, "{test}: cannot run under CI=true: {reason}");
    say_skip(test, reason);
    None
}

/// Prints a skip past libtest's capture (which only intercepts `print!`/`eprint!`), so the
/// reason shows in a normal `cargo test` run.
fn say_skip(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr(), "skipping {test}: {reason}");
}

fn load(devices: Vec<u64>, attach: Attach) -> Probe {
    let opts = ProbeOptions {
        devices,
        ignore_pid: std::process::id(),
        attach,
        ..ProbeOptions::default()
    };
    match Probe::load(&opts) {
        Ok(p) => p,
        Err(e) => panic!("probe load failed: {}", voltail_ebpf::error_chain(&e)),
    }
}

/// Polls until `want` returns true for an event or `within` passes; returns every event seen.
fn collect_until(
    probe: &mut Probe,
    within: Duration,
    mut want: impl FnMut(&WriteEvent) -> bool,
) -> (Vec<WriteEvent>, bool) {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut batch = Vec::new();
    while Instant::now() < deadline {
        batch.clear();
        probe
            .poll(Duration::from_millis(50), &mut batch)
            .expect("poll");
        let hit = batch.iter().any(&mut want);
        seen.extend_from_slice(&batch);
        if hit {
            return (seen, true);
        }
    }
    (seen, false)
}

fn ino_dev(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).expect("stat");
    (m.ino(), m.dev())
}

/// Runs this test binary as a writer child doing `op` on `path`; returns the child's pid.
fn run_child(op: &str, path: &Path) -> u32 {
    let mut child = Command::new(std::env::current_exe().expect("current_exe"))
        .args(["--exact", "child_main", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{op}:{}", path.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let pid = child.id();
    assert!(
        child.wait().expect("wait child").success(),
        "child {op} failed"
    );
    pid
}

/// Not a test of its own: the body of the writer child. Without the environment variable it
/// does nothing.
#[test]
fn child_main() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (op, path) = spec.split_once(':').expect("op:path");
    if let Some(n) = op.strip_prefix("many") {
        // One byte to each of n new files in the directory `path`.
        let n: usize = n.parse().expect("many<N>");
        for i in 0..n {
            std::fs::write(Path::new(path).join(format!("f{i}")), b"x").expect("write");
        }
        return;
    }
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for writing");
    match op {
        "pwrite" => {
            let n = file.write_at(b"pwrite!", 3).expect("pwrite");
            assert_eq!(n, 7);
        }
        "writev" => {
            let bufs = [std::io::IoSlice::new(b"ab"), std::io::IoSlice::new(b"cde")];
            let n = (&file).write_vectored(&bufs).expect("writev");
            assert_eq!(n, 5);
        }
        "pwritev" => {
            let bufs = [libc::iovec {
                iov_base: b"xyzw".as_ptr() as *mut libc::c_void,
                iov_len: 4,
            }];
            // SAFETY: the iovec points at a live 4-byte buffer that the kernel only reads, and the
            // fd is open for writing for the whole call.
            let n = unsafe {
                libc::pwritev(std::os::fd::AsRawFd::as_raw_fd(&file), bufs.as_ptr(), 1, 1)
            };
            assert_eq!(n, 4);
        }
        "pwritev2" => {
            let bufs = [libc::iovec {
                iov_base: b"v2".as_ptr() as *mut libc::c_void,
                iov_len: 2,
            }];
            // SAFETY: as for pwritev; flags 0 makes it behave like pwritev.
            let n = unsafe {
                libc::pwritev2(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    bufs.as_ptr(),
                    1,
                    0,
                    0,
                )
            };
            assert_eq!(n, 2);
        }
        other => panic!("unknown child op {other}"),
    }
}

/// Appends `text` (a `printf` format) to `path` from a `sh` child: a writer that is not this
/// process.
fn sh_append(path: &Path, text: &str) {
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("printf {text} >> '{}'", path.display()))
        .status()
        .expect("sh");
    assert!(st.success());
}

/// Every attachment the probe can use here: the default, the syscall tracepoints, and the
/// `tp_btf` enter+exit pair (x86_64 only).
fn attachments() -> Vec<Attach> {
    let mut all = vec![Attach::Auto, Attach::Tracepoints];
    if cfg!(target_arch = "x86_64") {
        all.push(Attach::TpBtf);
    }
    all
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("voltail-probe-test")
        .tempdir_in(std::env::temp_dir())
        .expect("tempdir")
}

fn new_file(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, b"").expect("create file");
    path
}

/// Asserts an event for `path` with `bytes` and `pid` arrives within 15 s.
fn expect_event(probe: &mut Probe, path: &Path, bytes: u64, pid: u32) {
    let (ino, dev) = ino_dev(path);
    let (seen, hit) = collect_until(probe, Duration::from_secs(15), |e| {
        e.ino == ino && e.dev == dev && e.bytes == bytes && e.pid == pid
    });
    let ours: Vec<_> = seen.iter().filter(|e| e.ino == ino).collect();
    assert!(
        hit,
        "no event {{dev {dev:#x}, ino {ino}, bytes {bytes}, pid {pid}}} within 15 s; events for this inode: {ours:?}"
    );
}

#[test]
fn write_by_child_is_reported_with_dev_ino_bytes_pid() {
    if can_test("write_by_child_is_reported_with_dev_ino_bytes_pid").is_none() {
        return;
    }
    let dir = temp_dir();
    let file = new_file(dir.path(), "app.log");
    let dev = std::fs::metadata(dir.path()).expect("stat dir").dev();
    let mut probe = load(vec![dev], Attach::Auto);

    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("printf hello >> '{}'", file.display()))
        .spawn()
        .expect("spawn sh");
    let pid = child.id();
    assert!(child.wait().expect("wait sh").success());
    expect_event(&mut probe, &file, 5, pid);

    assert!(
        probe.lost().is_ok(),
        "lost() must read the per-CPU counters"
    );
}

/// Every write call, through every attachment: the default exit-only `tp_btf` program reads the
/// fd from the saved registers, the syscall tracepoints and the `tp_btf` pair from the arguments.
#[test]
fn pwrite_writev_pwritev_and_pwritev2_are_reported() {
    if can_test("pwrite_writev_pwritev_and_pwritev2_are_reported").is_none() {
        return;
    }
    let dir = temp_dir();
    let file = new_file(dir.path(), "vec.log");
    let dev = std::fs::metadata(dir.path()).expect("stat dir").dev();
    for attach in attachments() {
        let mut probe = load(vec![dev], attach);
        if attach == Attach::Auto {
            assert_eq!(probe.attach_kind(), Attach::SysExit, "the default");
        }
        let pid = run_child("pwrite", &file);
        expect_event(&mut probe, &file, 7, pid);
        let pid = run_child("writev", &file);
        expect_event(&mut probe, &file, 5, pid);
        let pid = run_child("pwritev", &file);
        expect_event(&mut probe, &file, 4, pid);
        let pid = run_child("pwritev2", &file);
        expect_event(&mut probe, &file, 2, pid);

        // dd with seek= and conv=notrunc, as an operator would patch a file in place.
        let mut dd = Command::new("dd")
            .args([
                "if=/dev/zero",
                "bs=6",
                "count=1",
                "seek=2",
                "conv=notrunc",
                "status=none",
            ])
            .arg(format!("of={}", file.display()))
            .spawn()
            .expect("spawn dd");
        let pid = dd.id();
        assert!(dd.wait().expect("wait dd").success());
        expect_event(&mut probe, &file, 6, pid);
    }
}

#[test]
fn own_writes_and_unwatched_devices_are_not_reported() {
    if can_test("own_writes_and_unwatched_devices_are_not_reported").is_none() {
        return;
    }
    let dir = temp_dir();
    let dev = std::fs::metadata(dir.path()).expect("stat dir").dev();
    // /dev/shm is a tmpfs, a different device from the temp dir on this kind of machine.
    let shm = Path::new("/dev/shm");
    let shm_dev = std::fs::metadata(shm).map(|m| m.dev()).ok();
    assert_ne!(
        shm_dev,
        Some(dev),
        "the test needs /dev/shm on another device than {}",
        dir.path().display()
    );

    let own = new_file(dir.path(), "own.log");
    let sentinel = new_file(dir.path(), "sentinel.log");
    let mut probe = load(vec![dev], Attach::Auto);

    // Our own write: filtered by ignore_pid.
    let mut f = OpenOptions::new()
        .append(true)
        .open(&own)
        .expect("open own");
    f.write_all(b"not for the probe").expect("own write");
    drop(f);

    // A child's write on the unwatched tmpfs.
    let shm_file = if shm_dev.is_some() {
        let p = shm.join(format!("voltail-probe-test-{}", std::process::id()));
        std::fs::write(&p, b"").expect("create shm file");
        sh_append(&p, "unwatched");
        Some(p)
    } else {
        None
    };

    // Then a child's write that must arrive: the ring buffer is ordered, so once it is here any
    // event for the two files above would have been seen.
    sh_append(&sentinel, "x");
    let (sentinel_ino, _) = ino_dev(&sentinel);
    let (seen, hit) = collect_until(&mut probe, Duration::from_secs(15), |e| {
        e.ino == sentinel_ino
    });
    assert!(hit, "the sentinel write was not reported");

    let (own_ino, _) = ino_dev(&own);
    let me = std::process::id();
    assert!(
        !seen.iter().any(|e| e.pid == me),
        "the test process's own writes were reported: {:?}",
        seen.iter().filter(|e| e.pid == me).collect::<Vec<_>>()
    );
    assert!(!seen.iter().any(|e| e.ino == own_ino && e.dev == dev));
    if let Some(p) = shm_file {
        let (shm_ino, shm_dev) = ino_dev(&p);
        let _ = std::fs::remove_file(&p);
        assert!(
            !seen.iter().any(|e| e.ino == shm_ino && e.dev == shm_dev),
            "a write on the unwatched /dev/shm was reported"
        );
    }
    let devs: HashSet<u64> = seen.iter().map(|e| e.dev).collect();
    assert_eq!(devs, HashSet::from([dev]), "events from unwatched devices");
}

/// Events carry the inode of the directory the file is in, on every attachment.
#[test]
fn events_carry_the_directory_inode() {
    if can_test("events_carry_the_directory_inode").is_none() {
        return;
    }
    for attach in attachments() {
        let dir = temp_dir();
        let sub = dir.path().join("pod");
        std::fs::create_dir(&sub).expect("mkdir");
        let file = new_file(&sub, "app.log");
        let dev = std::fs::metadata(dir.path()).expect("stat dir").dev();
        let (ino, _) = ino_dev(&file);
        let (dir_ino, _) = ino_dev(&sub);
        let mut probe = load(vec![dev], attach);
        sh_append(&file, "x");
        let (seen, hit) = collect_until(&mut probe, Duration::from_secs(15), |e| e.ino == ino);
        assert!(hit, "{attach:?}: no event");
        let e = seen.iter().find(|e| e.ino == ino).expect("event");
        assert_eq!(e.dir_ino, dir_ino, "{attach:?}: {e:?}");
    }
}

/// A muted inode's writes send nothing while its span lasts, on every attachment (the check
/// is in the shared filter), and send again once it ended; other files are unaffected.
#[test]
fn a_muted_inode_sends_nothing_until_its_span_ends() {
    if can_test("a_muted_inode_sends_nothing_until_its_span_ends").is_none() {
        return;
    }
    for attach in attachments() {
        let dir = temp_dir();
        let muted = new_file(dir.path(), "debug.txt");
        let other = new_file(dir.path(), "app.log");
        let dev = std::fs::metadata(dir.path()).expect("stat dir").dev();
        let (ino, _) = ino_dev(&muted);
        let (other_ino, _) = ino_dev(&other);
        let mut probe = load(vec![dev], attach);
        probe.mute(dev, ino, Duration::from_secs(60)).expect("mute");
        // The muted file is written first: its event, were there one, would come before the
        // other file's (one ring buffer, reserved in write order).
        sh_append(&muted, "a");
        sh_append(&other, "bb");
        let (seen, hit) = collect_until(&mut probe, Duration::from_secs(15), |e| {
            e.ino == other_ino && e.bytes == 2
        });
        assert!(hit, "{attach:?}: no event for the file not muted");
        assert!(
            !seen.iter().any(|e| e.ino == ino),
            "{attach:?}: a muted inode's write was reported: {seen:?}"
        );
        // A short span, then a write after it ended.
        probe
            .mute(dev, ino, Duration::from_millis(100))
            .expect("mute again");
        std::thread::sleep(Duration::from_millis(200));
        sh_append(&muted, "ccc");
        let (_, hit) = collect_until(&mut probe, Duration::from_secs(15), |e| {
            e.ino == ino && e.bytes == 3
        });
        assert!(hit, "{attach:?}: no event after the mute ended");
    }
}

#[test]
fn set_devices_changes_the_filter() {
    if can_test("set_devices_changes_the_filter").is_none() {
        return;
    }
    let dir = temp_dir();
    let file = new_file(dir.path(), "toggle.log");
    let dev = std::fs::metadata(dir.path()).expect("stat dir").dev();
    let (ino, _) = ino_dev(&file);
    let mut probe = load(Vec::new(), Attach::Auto);

    let sh = |text: &str| sh_append(&file, text);
    sh("a");
    let (_, hit) = collect_until(&mut probe, Duration::from_millis(300), |e| e.ino == ino);
    assert!(!hit, "a write was reported with no device watched");

    probe.set_devices(&[dev]).expect("set_devices");
    sh("bb");
    let (_, hit) = collect_until(&mut probe, Duration::from_secs(15), |e| {
        e.ino == ino && e.bytes == 2
    });
    assert!(hit, "no event after the device was added");

    probe.set_devices(&[]).expect("set_devices empty");
    sh("ccc");
    let (_, hit) = collect_until(&mut probe, Duration::from_millis(300), |e| e.ino == ino);
    assert!(!hit, "a write was reported after the device was removed");
}

#[test]
fn tp_btf_fallback_reports_writes() {
    if can_test("tp_btf_fallback_reports_writes").is_none() {
        return;
    }
    if !cfg!(target_arch = "x86_64") {
        say_skip(
            "tp_btf_fallback_reports_writes",
            "the fallback is x86_64 only",
        );
        return;
    }
    let dir = temp_dir();
    let file = new_file(dir.path(), "btf.log");
    let dev = std::fs::metadata(dir.path()).expect("stat dir").dev();
    let mut probe = load(vec![dev], Attach::TpBtf);
    assert_eq!(probe.attach_kind(), Attach::TpBtf);

    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("printf fallback >> '{}'", file.display()))
        .spawn()
        .expect("spawn sh");
    let pid = child.id();
    assert!(child.wait().expect("wait").success());
    expect_event(&mut probe, &file, 8, pid);
    let pid = run_child("pwritev", &file);
    expect_event(&mut probe, &file, 4, pid);
    let pid = run_child("pwritev2", &file);
    expect_event(&mut probe, &file, 2, pid);
}

#[test]
fn events_carry_the_writer_cgroup_id() {
    if can_test("events_carry_the_writer_cgroup_id").is_none() {
        return;
    }
    let dir = temp_dir();
    let file = new_file(dir.path(), "cg.log");
    let dev = std::fs::metadata(dir.path()).expect("stat dir").dev();
    let (ino, _) = ino_dev(&file);
    let mut probe = load(vec![dev], Attach::Auto);
    sh_append(&file, "cg");
    let (seen, hit) = collect_until(&mut probe, Duration::from_secs(15), |e| e.ino == ino);
    assert!(hit);
    let event = seen.iter().find(|e| e.ino == ino).expect("event");
    // On cgroup v2 the id is the inode number of the writer's cgroup directory; the child ran in
    // ours. Without a unified hierarchy only check it is set.
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    match cgroup.lines().find_map(|l| l.strip_prefix("0::")) {
        Some(rel) => {
            let dir = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
            match std::fs::metadata(&dir) {
                Ok(m) => assert_eq!(event.cgroup_id, m.ino(), "cgroup id of {}", dir.display()),
                Err(_) => assert_ne!(event.cgroup_id, 0),
            }
        }
        None => assert_ne!(event.cgroup_id, 0),
    }
}

/// A tmpfs mounted on a temp dir: a device only this test writes to. Unmounted on drop.
struct PrivateTmpfs {
    dir: tempfile::TempDir,
}

impl PrivateTmpfs {
    fn new() -> PrivateTmpfs {
        let dir = temp_dir();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "voltail-probe-test"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "mounting a tmpfs on {} failed",
            dir.path().display()
        );
        PrivateTmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrivateTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn writes_into_an_unread_event_are_folded_and_a_write_after_the_drain_is_reported() {
    if can_test("writes_into_an_unread_event_are_folded_and_a_write_after_the_drain_is_reported")
        .is_none()
    {
        return;
    }
    let fs = PrivateTmpfs::new();
    let file = new_file(fs.path(), "fold.log");
    let (ino, dev) = ino_dev(&file);
    let mut probe = load(vec![dev], Attach::Auto);
    let folded_before = probe.coalesced().expect("coalesced");

    // One process writes three times, then waits for a line on stdin, then writes once more.
    // Pinned to one CPU: folding is per CPU, and taskset execs sh, so the pid stays the child's.
    let mut child = Command::new("taskset")
        .args(["-c", "0", "sh", "-c"])
        .arg(format!(
            "f='{}'; printf a >> \"$f\"; printf b >> \"$f\"; printf c >> \"$f\"; read go; printf d >> \"$f\"",
            file.display()
        ))
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn sh");
    let pid = child.id();
    // Let the three writes happen before the first drain.
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::fs::metadata(&file).expect("stat").len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (seen, hit) = collect_until(&mut probe, Duration::from_secs(15), |e| e.ino == ino);
    assert!(hit, "no event for the first writes");
    // Anything still in flight for this file arrives within the batch window.
    let (late, _) = collect_until(&mut probe, Duration::from_millis(50), |_| false);
    let events = seen.iter().chain(&late).filter(|e| e.ino == ino).count() as u64;
    let folded = probe.coalesced().expect("coalesced") - folded_before;
    assert!(seen.iter().all(|e| e.ino != ino || e.pid == pid));
    assert_eq!(
        events + folded,
        3,
        "every write is either an event or folded ({events} events, {folded} folded)"
    );
    assert!(
        folded >= 1,
        "three quick writes by one process were not folded at all"
    );

    // The event was read: the same process's next write must be reported again.
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("tell the child to go on");
    assert!(child.wait().expect("wait sh").success());
    expect_event(&mut probe, &file, 1, pid);
}

#[test]
fn a_full_ring_buffer_counts_lost_events() {
    if can_test("a_full_ring_buffer_counts_lost_events").is_none() {
        return;
    }
    const FILES: u64 = 300;
    let fs = PrivateTmpfs::new();
    let (_, dev) = ino_dev(fs.path());
    // One page of ring holds about 85 events; nobody drains while the child writes.
    let page = page_size();
    let mut probe = Probe::load(&ProbeOptions {
        devices: vec![dev],
        ignore_pid: std::process::id(),
        ring_bytes: page,
        ..ProbeOptions::default()
    })
    .expect("load with a one-page ring");
    assert_eq!(probe.lost().expect("lost"), 0);
    run_child(&format!("many{FILES}"), fs.path());

    let (seen, _) = collect_until(&mut probe, Duration::from_millis(300), |_| false);
    let lost = probe.lost().expect("lost");
    let events = seen.iter().filter(|e| e.dev == dev).count() as u64;
    assert!(
        lost > 0,
        "{FILES} events into a one-page ring lost none ({events} arrived)"
    );
    assert_eq!(events + lost, FILES, "{events} events + {lost} lost");
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(page).expect("a page size fits u32")
}

/// The bench's floor: the empty program attaches where the probe does and reports nothing,
/// while the probe itself, loaded next, reports the same kind of write.
#[test]
fn the_floor_program_attaches_and_reports_nothing() {
    if can_test("the_floor_program_attaches_and_reports_nothing").is_none() {
        return;
    }
    let fs = PrivateTmpfs::new();
    let file = new_file(fs.path(), "floor.log");
    let (ino, dev) = ino_dev(&file);
    let mut floor = load(vec![dev], Attach::Floor);
    assert_eq!(floor.attach_kind(), Attach::Floor);
    let pid = run_child("pwrite", &file);
    let (seen, _) = collect_until(&mut floor, Duration::from_millis(300), |_| false);
    assert!(seen.is_empty(), "the empty program reported {seen:?}");
    drop(floor);
    let mut probe = load(vec![dev], Attach::SysExit);
    let again = run_child("pwrite", &file);
    let (seen, hit) = collect_until(&mut probe, Duration::from_secs(15), |e| {
        e.ino == ino && e.pid == again
    });
    assert!(
        hit,
        "the probe missed the write the floor did not report: {seen:?}"
    );
    assert_ne!(pid, again);
}
