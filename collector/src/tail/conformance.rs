//! The read-backend conformance suite: every [`ReadBackend`] must give the same answers as plain
//! syscalls and `std::fs`.
//!
//! Each check is a function over `&mut dyn ReadBackend`; [`backends!`] instantiates all of them
//! for every backend (sequential pread, pooled pread, io_uring with the default ring and with a
//! tiny one that forces refills). A backend the kernel refuses (io_uring under seccomp) is
//! skipped with a note on stderr, not failed; `select`'s tests cover that fallback.
//!
//! The `#[ignore]`d [`round_timing`] prints how long one stat+read round over 10,000 files takes
//! per backend on the local disk and on `/dev/shm`; it measures, it never asserts a time.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use proptest::prelude::*;

use super::backend::{Errno, ReadBackend, ReadOp, StatOp};
use super::pread::{PreadBackend, PreadPool};
use super::uring::{UringBackend, UringError, UringOptions};

/// Checks that hold thousands of descriptors run one at a time (the fd limit is shared).
static MANY_FDS: Mutex<()> = Mutex::new(());

fn uring(opts: UringOptions) -> Option<Box<dyn ReadBackend>> {
    match UringBackend::with_options(opts) {
        Ok(b) => Some(Box::new(b)),
        Err(e @ (UringError::Denied { .. } | UringError::Unsupported { .. })) => {
            eprintln!("io_uring refused, check skipped: {e}");
            None
        }
        Err(e) => panic!("io_uring setup failed: {e}"),
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in a temp path")
}

fn write_file(p: &Path, data: &[u8]) -> File {
    let mut f = File::create(p).expect("create");
    f.write_all(data).expect("write");
    File::open(p).expect("open")
}

/// Bytes that differ at every offset, so a read at the wrong place is caught.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// A descriptor number that is certainly closed, even while other tests open files: the
/// highest number the fd limit allows, which the kernel hands out (lowest free first) only when
/// every number below it is taken.
fn closed_fd() -> RawFd {
    // SAFETY: rlimit is plain old data; all-zero is a valid value.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is a valid out-pointer for the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert_eq!(rc, 0, "getrlimit");
    let top = lim.rlim_cur.clamp(64, 1 << 20) as RawFd - 1;
    let f = File::open("/").expect("open /");
    // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own; the copy is closed below.
    let fd = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_DUPFD_CLOEXEC, top) };
    assert_eq!(fd, top, "no descriptor free at the top of the limit");
    // SAFETY: `fd` is ours (just duplicated) and nothing else refers to it.
    unsafe { libc::close(fd) };
    fd
}

/// Whether `dir` is on a network or FUSE filesystem (the suite can run there with `TMPDIR`).
fn on_network_fs(dir: &Path) -> bool {
    super::select::fs_kind(dir).is_some_and(|k| k.is_network())
}

fn stat_matches_metadata(b: &mut dyn ReadBackend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths: Vec<PathBuf> = (0..5).map(|i| dir.path().join(format!("f{i}"))).collect();
    let files: Vec<File> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| write_file(p, &pattern(i * 1000 + 7, i as u8)))
        .collect();
    let cpaths: Vec<CString> = paths.iter().map(|p| cstr(p)).collect();
    let mut ops: Vec<StatOp<'_>> = files
        .iter()
        .zip(&cpaths)
        .map(|(f, c)| StatOp::new(f.as_raw_fd(), Some(c)))
        .collect();
    b.stat_batch(&mut ops);
    for (op, p) in ops.iter().zip(&paths) {
        let m = fs::symlink_metadata(p).expect("metadata");
        for s in [
            op.fd_stat.expect("fd stat"),
            op.path_stat.expect("path stat"),
        ] {
            assert_eq!(s.size, m.size(), "{}", p.display());
            assert_eq!(s.ino, m.ino());
            assert_eq!(s.dev, m.dev());
            assert_eq!(s.nlink, m.nlink());
            assert_eq!(s.mode, m.mode());
            assert_eq!(s.mtime_ns, m.mtime() * 1_000_000_000 + m.mtime_nsec());
            assert_eq!(s.ctime_ns, m.ctime() * 1_000_000_000 + m.ctime_nsec());
            assert!(s.is_file());
        }
    }
}

fn stat_without_path_leaves_path_pending(b: &mut dyn ReadBackend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = write_file(&dir.path().join("a"), b"abc");
    let mut ops = [StatOp::new(f.as_raw_fd(), None)];
    b.stat_batch(&mut ops);
    assert_eq!(ops[0].fd_stat.expect("fd stat").size, 3);
    assert_eq!(ops[0].path_stat, Err(Errno::PENDING));
}

fn stat_of_unlinked_open_file(b: &mut dyn ReadBackend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("gone");
    let f = write_file(&p, b"still here\n");
    fs::remove_file(&p).expect("unlink");
    let c = cstr(&p);
    let mut ops = [StatOp::new(f.as_raw_fd(), Some(&c))];
    b.stat_batch(&mut ops);
    assert_eq!(ops[0].path_stat, Err(Errno(libc::ENOENT)));
    match ops[0].fd_stat {
        Ok(s) => {
            assert_eq!(s.nlink, 0);
            assert_eq!(s.size, 11);
        }
        // A network filesystem may forget an unlinked inode (NFS: ESTALE from another client;
        // the FUSE stand-in: ENOENT); a local one never does.
        Err(e) if on_network_fs(dir.path()) => {
            assert!(e.0 == libc::ENOENT || e.0 == libc::ESTALE, "{e}");
        }
        Err(e) => panic!("fd stat of an unlinked open file: {e}"),
    }
}

fn stat_of_missing_path_is_enoent(b: &mut dyn ReadBackend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = write_file(&dir.path().join("here"), b"x");
    let missing = cstr(&dir.path().join("nope/never"));
    let missing_leaf = cstr(&dir.path().join("never"));
    let mut ops = [
        StatOp::new(f.as_raw_fd(), Some(&missing)),
        StatOp::new(f.as_raw_fd(), Some(&missing_leaf)),
    ];
    b.stat_batch(&mut ops);
    for op in &ops {
        assert!(op.fd_stat.is_ok());
        assert_eq!(op.path_stat, Err(Errno(libc::ENOENT)));
    }
}

fn stat_does_not_follow_symlinks(b: &mut dyn ReadBackend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("target");
    let link = dir.path().join("link");
    let f = write_file(&target, b"0123456789");
    if let Err(e) = std::os::unix::fs::symlink(&target, &link) {
        // Some network filesystems (the FUSE stand-in among them) have no symlinks.
        assert!(on_network_fs(dir.path()), "symlink: {e}");
        return eprintln!("no symlinks on this filesystem, check skipped: {e}");
    }
    let c = cstr(&link);
    let mut ops = [StatOp::new(f.as_raw_fd(), Some(&c))];
    b.stat_batch(&mut ops);
    let via_fd = ops[0].fd_stat.expect("fd stat");
    let via_path = ops[0].path_stat.expect("path stat");
    let lm = fs::symlink_metadata(&link).expect("link metadata");
    assert_eq!(via_path.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(via_path.ino, lm.ino());
    assert_ne!(via_path.ino, via_fd.ino);
    assert!(!via_path.is_file());
}

fn stat_of_closed_fd_is_ebadf(b: &mut dyn ReadBackend) {
    let fd = closed_fd();
    let mut ops = [StatOp::new(fd, None), StatOp::new(-1, Some(c"/"))];
    b.stat_batch(&mut ops);
    assert_eq!(ops[0].fd_stat, Err(Errno(libc::EBADF)));
    // A negative descriptor means "path only": the descriptor is not stated at all.
    assert_eq!(ops[1].fd_stat, Err(Errno::PENDING));
    assert!(ops[1].path_stat.is_ok());
}

fn reads_at_offsets(b: &mut dyn ReadBackend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = pattern(10_000, 3);
    let f = write_file(&dir.path().join("r"), &data);
    let fd = f.as_raw_fd();
    let bad = closed_fd();
    let mut bufs = vec![vec![0u8; 4096]; 7];
    let mut big = vec![0u8; 128 * 1024];
    let mut empty: Vec<u8> = Vec::new();
    let offsets = [0u64, 1000, 8000, 10_000, 50_000, 0, u64::MAX];
    let mut ops: Vec<ReadOp<'_>> = bufs
        .iter_mut()
        .zip(offsets)
        .enumerate()
        .map(|(i, (buf, offset))| ReadOp {
            fd: if i == 5 { bad } else { fd },
            offset,
            buf: buf.as_mut_slice(),
            result: Err(Errno::PENDING),
        })
        .collect();
    ops.push(ReadOp {
        fd,
        offset: 0,
        buf: &mut big,
        result: Err(Errno::PENDING),
    });
    ops.push(ReadOp {
        fd,
        offset: 5,
        buf: &mut empty,
        result: Err(Errno::PENDING),
    });
    b.read_batch(&mut ops);
    let r: Vec<Result<usize, Errno>> = ops.iter().map(|o| o.result).collect();
    assert_eq!(r[0], Ok(4096), "full read");
    assert_eq!(r[1], Ok(4096), "full read inside");
    assert_eq!(r[2], Ok(2000), "short read at end of file");
    assert_eq!(r[3], Ok(0), "at end of file");
    assert_eq!(r[4], Ok(0), "past end of file");
    assert_eq!(r[5], Err(Errno(libc::EBADF)), "closed descriptor");
    assert_eq!(r[6], Err(Errno(libc::EINVAL),), "offset past i64::MAX");
    assert_eq!(r[7], Ok(10_000), "a buffer larger than the file");
    assert_eq!(r[8], Ok(0), "an empty buffer");
    assert_eq!(&ops[0].buf[..], &data[..4096]);
    assert_eq!(&ops[1].buf[..], &data[1000..5096]);
    assert_eq!(&ops[2].buf[..2000], &data[8000..]);
    assert_eq!(&ops[7].buf[..10_000], &data[..]);
}

fn empty_batches(b: &mut dyn ReadBackend) {
    b.stat_batch(&mut []);
    b.read_batch(&mut []);
}

fn same_fd_many_times_in_one_batch(b: &mut dyn ReadBackend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = pattern(64 * 1024, 9);
    let f = write_file(&dir.path().join("same"), &data);
    let mut bufs = vec![vec![0u8; 1024]; 64];
    let mut ops: Vec<ReadOp<'_>> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, buf)| ReadOp {
            fd: f.as_raw_fd(),
            offset: (i * 1024) as u64,
            buf,
            result: Err(Errno::PENDING),
        })
        .collect();
    b.read_batch(&mut ops);
    for (i, op) in ops.iter().enumerate() {
        assert_eq!(op.result, Ok(1024));
        assert_eq!(&op.buf[..], &data[i * 1024..(i + 1) * 1024]);
    }
    let mut sops: Vec<StatOp<'_>> = (0..100).map(|_| StatOp::new(f.as_raw_fd(), None)).collect();
    b.stat_batch(&mut sops);
    assert!(sops
        .iter()
        .all(|o| o.fd_stat.map(|s| s.size) == Ok(64 * 1024)));
}

/// More files than any ring has entries: 3,000 stat pairs and reads in one batch each.
fn big_batches(b: &mut dyn ReadBackend) {
    let _one_at_a_time = MANY_FDS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let n = 3_000;
    let paths: Vec<PathBuf> = (0..n)
        .map(|i| dir.path().join(format!("{i}.log")))
        .collect();
    let files: Vec<File> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| write_file(p, &pattern(i % 700, i as u8)))
        .collect();
    let cpaths: Vec<CString> = paths.iter().map(|p| cstr(p)).collect();
    let mut ops: Vec<StatOp<'_>> = files
        .iter()
        .zip(&cpaths)
        .enumerate()
        // Every third op without a path, to mix one- and two-job ops.
        .map(|(i, (f, c))| StatOp::new(f.as_raw_fd(), (i % 3 != 0).then_some(c.as_c_str())))
        .collect();
    b.stat_batch(&mut ops);
    for (i, op) in ops.iter().enumerate() {
        let m = fs::metadata(&paths[i]).expect("metadata");
        assert_eq!(op.fd_stat.map(|s| (s.ino, s.size)), Ok((m.ino(), m.size())));
        if i % 3 == 0 {
            assert_eq!(op.path_stat, Err(Errno::PENDING));
        } else {
            assert_eq!(
                op.path_stat.map(|s| (s.ino, s.size)),
                Ok((m.ino(), m.size()))
            );
        }
    }
    let mut bufs = vec![vec![0u8; 512]; n];
    let mut rops: Vec<ReadOp<'_>> = files
        .iter()
        .zip(bufs.iter_mut())
        .enumerate()
        .map(|(i, (f, buf))| ReadOp {
            fd: f.as_raw_fd(),
            offset: (i % 5) as u64,
            buf,
            result: Err(Errno::PENDING),
        })
        .collect();
    b.read_batch(&mut rops);
    for (i, op) in rops.iter().enumerate() {
        let data = pattern(i % 700, i as u8);
        let start = (i % 5).min(data.len());
        let want = &data[start..(start + 512).min(data.len())];
        assert_eq!(op.result, Ok(want.len()), "file {i}");
        assert_eq!(&op.buf[..want.len()], want, "file {i}");
    }
}

/// Random reads of a random file give the bytes `std::fs::read` gives.
fn random_reads_match_fs_read(b: &mut dyn ReadBackend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    // The runner takes a `Fn`; the backend is used by one case at a time.
    let b = std::cell::RefCell::new(b);
    let strategy = (
        0usize..300_000,
        any::<u8>(),
        prop::collection::vec((0u64..320_000, 0usize..140_000), 0..40),
    );
    let result = runner.run(&strategy, |(size, seed, reads)| {
        let p = dir.path().join("prop");
        drop(write_file(&p, &pattern(size, seed)));
        let f = File::open(&p).expect("open");
        let data = fs::read(&p).expect("read");
        let mut bufs: Vec<Vec<u8>> = reads.iter().map(|&(_, len)| vec![0xAA; len]).collect();
        let mut ops: Vec<ReadOp<'_>> = reads
            .iter()
            .zip(bufs.iter_mut())
            .map(|(&(offset, _), buf)| ReadOp {
                fd: f.as_raw_fd(),
                offset,
                buf,
                result: Err(Errno::PENDING),
            })
            .collect();
        b.borrow_mut().read_batch(&mut ops);
        for op in &ops {
            let start = (op.offset as usize).min(data.len());
            let want = &data[start..(start + op.buf.len()).min(data.len())];
            // Regular local files give full reads; a short read would be legal but is not
            // expected here, so it is checked too.
            prop_assert_eq!(op.result, Ok(want.len()));
            prop_assert_eq!(&op.buf[..want.len()], want);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

macro_rules! backends {
    ($($name:ident => $make:expr;)*) => {$(
        mod $name {
            use super::*;

            fn with(check: fn(&mut dyn ReadBackend)) {
                let made: Option<Box<dyn ReadBackend>> = $make;
                if let Some(mut b) = made {
                    check(&mut *b);
                }
            }

            #[test]
            fn stat_matches_metadata() { with(super::stat_matches_metadata) }
            #[test]
            fn stat_without_path_leaves_path_pending() {
                with(super::stat_without_path_leaves_path_pending)
            }
            #[test]
            fn stat_of_unlinked_open_file() { with(super::stat_of_unlinked_open_file) }
            #[test]
            fn stat_of_missing_path_is_enoent() { with(super::stat_of_missing_path_is_enoent) }
            #[test]
            fn stat_does_not_follow_symlinks() { with(super::stat_does_not_follow_symlinks) }
            #[test]
            fn stat_of_closed_fd_is_ebadf() { with(super::stat_of_closed_fd_is_ebadf) }
            #[test]
            fn reads_at_offsets() { with(super::reads_at_offsets) }
            #[test]
            fn empty_batches() { with(super::empty_batches) }
            #[test]
            fn same_fd_many_times_in_one_batch() { with(super::same_fd_many_times_in_one_batch) }
            #[test]
            fn big_batches() { with(super::big_batches) }
            #[test]
            fn random_reads_match_fs_read() { with(super::random_reads_match_fs_read) }
        }
    )*};
}

backends! {
    pread_sequential => Some(Box::new(PreadBackend));
    pread_pool => Some(Box::new(PreadPool::new(8)));
    pread_pool_of_one => Some(Box::new(PreadPool::new(1)));
    uring_default => uring(UringOptions::default());
    uring_tiny_ring => uring(UringOptions { entries: 8, max_workers: 0, async_reads: false });
    uring_async_reads => uring(UringOptions { async_reads: true, ..UringOptions::default() });
}

/// Times one stat+read round over 10,000 files per backend, on the local disk and on
/// `/dev/shm`. Run with `cargo test --release -p voltail round_timing -- --ignored --nocapture`;
/// set `VOLTAIL_TIMING_DIRS=/a:/b` to measure elsewhere (a FUSE mount, for one), and
/// `VOLTAIL_TIMING_ROUNDS` (default 5) to take the best of fewer rounds where a round is slow,
/// and `VOLTAIL_TIMING_BACKENDS` (comma-separated names as printed) to measure only some.
#[test]
#[ignore = "measurement, not a check: prints timings"]
fn round_timing() {
    use std::time::Instant;

    let _one_at_a_time = MANY_FDS.lock().unwrap_or_else(|e| e.into_inner());
    let n = 10_000;
    let rounds: usize = std::env::var("VOLTAIL_TIMING_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dirs: Vec<PathBuf> = match std::env::var_os("VOLTAIL_TIMING_DIRS") {
        Some(v) => std::env::split_paths(&v).collect(),
        None => vec![std::env::temp_dir(), PathBuf::from("/dev/shm")],
    };
    for base in dirs {
        let dir = tempfile::tempdir_in(&base).expect("tempdir");
        let paths: Vec<PathBuf> = (0..n)
            .map(|i| dir.path().join(format!("pod{}/{i}.log", i / 5)))
            .collect();
        for p in &paths {
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent).expect("mkdir");
            }
        }
        let files: Vec<File> = paths
            .iter()
            .map(|p| write_file(p, &pattern(2000, 1)))
            .collect();
        let cpaths: Vec<CString> = paths.iter().map(|p| cstr(p)).collect();
        let mut bufs = vec![vec![0u8; 128 * 1024]; n];
        let mut makers: Vec<(&str, Box<dyn ReadBackend>)> = vec![
            ("pread", Box::new(PreadBackend)),
            ("pread_pool(16)", Box::new(PreadPool::new(16))),
        ];
        if let Some(u) = uring(UringOptions::default()) {
            makers.push(("io_uring", u));
        }
        let async_reads = UringOptions {
            async_reads: true,
            // VOLTAIL_TIMING_WORKERS: the io-wq worker limit of this one.
            max_workers: std::env::var("VOLTAIL_TIMING_WORKERS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(UringOptions::default().max_workers),
            ..UringOptions::default()
        };
        if let Some(u) = uring(async_reads) {
            makers.push(("io_uring+async", u));
        }
        // VOLTAIL_TIMING_BACKENDS=io_uring,pread_pool(16) measures only those (a slow
        // filesystem makes the sequential one take a minute).
        if let Ok(only) = std::env::var("VOLTAIL_TIMING_BACKENDS") {
            makers.retain(|(name, _)| only.split(',').any(|o| o == *name));
        }
        println!("{} ({n} files, best of {rounds} rounds)", base.display());
        let mut first = None;
        for (name, b) in &mut makers {
            let mut best_stat = f64::MAX;
            let mut best_read = f64::MAX;
            let mut best_cpu = f64::MAX;
            for _ in 0..rounds {
                let mut ops: Vec<StatOp<'_>> = files
                    .iter()
                    .zip(&cpaths)
                    .map(|(f, c)| StatOp::new(f.as_raw_fd(), Some(c)))
                    .collect();
                let cpu = process_cpu_ms();
                let t = Instant::now();
                b.stat_batch(&mut ops);
                best_stat = best_stat.min(t.elapsed().as_secs_f64() * 1e3);
                assert!(ops.iter().all(|o| o.fd_stat.is_ok() && o.path_stat.is_ok()));
                let mut rops: Vec<ReadOp<'_>> = files
                    .iter()
                    .zip(bufs.iter_mut())
                    .map(|(f, buf)| ReadOp {
                        fd: f.as_raw_fd(),
                        offset: 0,
                        buf,
                        result: Err(Errno::PENDING),
                    })
                    .collect();
                let t = Instant::now();
                b.read_batch(&mut rops);
                best_read = best_read.min(t.elapsed().as_secs_f64() * 1e3);
                best_cpu = best_cpu.min(process_cpu_ms() - cpu);
                assert!(rops.iter().all(|o| o.result == Ok(2000)));
            }
            let total = best_stat + best_read;
            let base_total = *first.get_or_insert(total);
            println!(
                "  {name:<16} stat {best_stat:8.2} ms  read {best_read:8.2} ms  round {total:8.2} ms  x{:.2} of the first  cpu {best_cpu:8.2} ms",
                total / base_total
            );
        }
    }
}

/// CPU time of the whole process (every thread, io-wq workers included), in milliseconds.
fn process_cpu_ms() -> f64 {
    // SAFETY: timespec is plain old data; all-zero is a valid value.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is a valid out-pointer for the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}
