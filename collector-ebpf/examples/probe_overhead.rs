//! Measures what the probe costs a write-heavy writer, and how fast its events arrive.
//!
//! Run as root: `cargo run --release -p voltail-ebpf --example probe_overhead [-- SECONDS [DIR]]`.
//! By default it mounts a private tmpfs (a device only this run writes to) in a temp dir; with
//! DIR it writes there instead (e.g. `/tmp` on the root disk, shared with everything else).
//!
//! Overhead phases, same process, back to back: a writer thread does 4 KiB `write`s in a tight
//! loop (rewinding every 1 MiB) for SECONDS each, with the probe
//!   off, then twice: each attachment (syscall tracepoints, tp_btf enter+exit, tp_btf sys_exit
//!   only) watching the device, two attached but not watching it, off.
//! For each it prints writes/s and the writer thread's CPU per write, plus the drain thread's CPU.
//!
//! Latency: 1000 single writes 1 ms apart (inside the default 10 ms batch window), then 1000
//! writes 20 ms apart (each after a quiet spell); a drain thread in `Probe::poll` timestamps each
//! event; prints p50/p99/max of write-start -> event-received.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use voltail_ebpf::{Attach, Probe, ProbeOptions};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let dir_arg = args.next().map(PathBuf::from);
    if !voltail_ebpf::COMPILED_IN {
        bail!("the probe is compiled out (no clang at build time)");
    }
    let scratch = tempfile::tempdir()?;
    let (dir, mounted) = match dir_arg {
        Some(d) => (d, false),
        None => {
            mount_tmpfs(scratch.path())?;
            (scratch.path().to_path_buf(), true)
        }
    };
    let result = run(&dir, Duration::from_secs(secs));
    if mounted {
        umount(scratch.path());
    }
    result
}

fn run(dir: &Path, phase: Duration) -> Result<()> {
    let file = dir.join("bench.log");
    std::fs::write(&file, b"")?;
    let meta = std::fs::metadata(&file)?;
    let (dev, ino) = (meta.dev(), meta.ino());
    println!(
        "file {} (st_dev {:#x}, ino {ino}), {} s per phase, {} CPUs",
        file.display(),
        dev,
        phase.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let window = voltail_ebpf::DEFAULT_BATCH_WINDOW;
    // Two passes over the attachments, with the probe off between and around them: the
    // machine is noisy, so compare within a pass and check the passes agree.
    let mut phases: Vec<(&str, Option<Setup>)> = vec![("probe off", None)];
    for _ in 0..2 {
        phases.extend([
            (
                "tracepoints, watched",
                Some((vec![dev], Attach::Tracepoints, window)),
            ),
            (
                "tp_btf enter+exit, watched",
                Some((vec![dev], Attach::TpBtf, window)),
            ),
            (
                "sys_exit only, watched",
                Some((vec![dev], Attach::SysExit, window)),
            ),
            (
                "tracepoints, not watched",
                Some((vec![], Attach::Tracepoints, window)),
            ),
            (
                "sys_exit only, not watched",
                Some((vec![], Attach::SysExit, window)),
            ),
            ("probe off", None),
        ]);
    }
    let mut base = None;
    println!(
        "{:<34} {:>10} {:>9} {:>7} {:>9} {:>8} {:>10} {:>10}",
        "phase", "writes/s", "ns/write", "ratio", "events", "drains", "folded", "drain CPU"
    );
    for (name, probe) in phases {
        let m = overhead_phase(&file, phase, probe)?;
        let ns = m.writer_cpu.as_nanos() as f64 / m.writes as f64;
        let base_ns = *base.get_or_insert(ns);
        println!(
            "{:<34} {:>10.0} {:>9.0} {:>7.3} {:>9} {:>8} {:>10} {:>9.2}%",
            name,
            m.writes as f64 / m.wall.as_secs_f64(),
            ns,
            ns / base_ns,
            m.events,
            m.drains,
            m.folded,
            100.0 * m.drain_cpu.as_secs_f64() / m.wall.as_secs_f64(),
        );
    }
    latency(&file, dev, ino, Duration::from_millis(1))?;
    latency(&file, dev, ino, Duration::from_millis(20))
}

/// Watched devices, attachment, batch window of one phase with the probe on.
type Setup = (Vec<u64>, Attach, Duration);

struct Measured {
    writes: u64,
    wall: Duration,
    writer_cpu: Duration,
    events: u64,
    /// Polls that returned events.
    drains: u64,
    /// Writes folded into unread events, plus events lost to a full ring buffer.
    folded: u64,
    drain_cpu: Duration,
}

fn overhead_phase(file: &Path, phase: Duration, probe: Option<Setup>) -> Result<Measured> {
    let stop = Arc::new(AtomicBool::new(false));
    let drain = match probe {
        None => None,
        Some((devices, attach, batch_window)) => {
            let mut probe = Probe::load(&ProbeOptions {
                devices,
                // The writer is this process: ignore a pid that never writes instead.
                ignore_pid: 0,
                attach,
                batch_window,
                ..ProbeOptions::default()
            })
            .context("loading the probe")?;
            let stop = Arc::clone(&stop);
            Some(std::thread::spawn(move || {
                let mut events = 0u64;
                let mut drains = 0u64;
                let mut buf = Vec::with_capacity(65536);
                let cpu0 = thread_cpu();
                while !stop.load(Ordering::Relaxed) {
                    buf.clear();
                    if probe.poll(Duration::from_millis(100), &mut buf).is_err() {
                        break;
                    }
                    events += buf.len() as u64;
                    if !buf.is_empty() {
                        drains += 1;
                    }
                }
                let folded = probe.coalesced().unwrap_or(0) + probe.lost().unwrap_or(0);
                (events, drains, folded, thread_cpu() - cpu0)
            }))
        }
    };
    // Let the drain thread settle into its wait.
    std::thread::sleep(Duration::from_millis(100));

    let f = std::fs::OpenOptions::new().write(true).open(file)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let block = [b'x'; 4096];
    let mut writes = 0u64;
    let cpu0 = thread_cpu();
    let start = Instant::now();
    let end = start + phase;
    while Instant::now() < end {
        for _ in 0..256 {
            // SAFETY: `block` is a live 4 KiB buffer the kernel only reads; `fd` is open.
            let n = unsafe { libc::write(fd, block.as_ptr().cast(), block.len()) };
            if n != block.len() as isize {
                bail!("short write: {n}");
            }
        }
        writes += 256;
        // SAFETY: plain lseek on an open fd.
        unsafe { libc::lseek(fd, 0, libc::SEEK_SET) };
    }
    let wall = start.elapsed();
    let writer_cpu = thread_cpu() - cpu0;
    stop.store(true, Ordering::Relaxed);
    let (events, drains, folded, drain_cpu) = match drain {
        Some(t) => t.join().map_err(|_| anyhow::anyhow!("drain panicked"))?,
        None => (0, 0, 0, Duration::ZERO),
    };
    Ok(Measured {
        writes,
        wall,
        writer_cpu,
        events,
        drains,
        folded,
        drain_cpu,
    })
}

fn latency(file: &Path, dev: u64, ino: u64, gap: Duration) -> Result<()> {
    const N: usize = 1000;
    // The default attachment, as the daemon loads it.
    let mut probe = Probe::load(&ProbeOptions {
        devices: vec![dev],
        ignore_pid: 0,
        ..ProbeOptions::default()
    })?;
    let (tx, rx) = mpsc::channel::<Instant>();
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = Arc::clone(&stop);
    let drain = std::thread::spawn(move || {
        let mut buf = Vec::new();
        while !thread_stop.load(Ordering::Relaxed) {
            buf.clear();
            if probe.poll(Duration::from_millis(100), &mut buf).is_err() {
                break;
            }
            let now = Instant::now();
            for e in &buf {
                if e.ino == ino && e.dev == dev {
                    let _ = tx.send(now);
                }
            }
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let f = std::fs::OpenOptions::new().append(true).open(file)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let line = b"a log line of moderate length, as a pod would write it\n";
    let mut lat = Vec::with_capacity(N);
    for _ in 0..N {
        let t0 = Instant::now();
        // SAFETY: `line` is a live buffer the kernel only reads; `fd` is open.
        let n = unsafe { libc::write(fd, line.as_ptr().cast(), line.len()) };
        if n != line.len() as isize {
            bail!("short write: {n}");
        }
        let t1 = rx
            .recv_timeout(Duration::from_secs(2))
            .context("no event within 2 s")?;
        lat.push(t1.saturating_duration_since(t0));
        std::thread::sleep(gap);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = drain.join();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "latency write -> event received, {N} writes {gap:?} apart: p50 {:?}  p99 {:?}  max {:?}",
        pct(0.50),
        pct(0.99),
        lat[lat.len() - 1]
    );
    Ok(())
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn mount_tmpfs(at: &Path) -> Result<()> {
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "voltail-bench"])
        .arg(at)
        .status()?;
    if !st.success() {
        bail!("mounting a tmpfs on {} failed", at.display());
    }
    Ok(())
}

fn umount(at: &Path) {
    let _ = std::process::Command::new("umount").arg(at).status();
}
