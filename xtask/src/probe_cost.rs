//! What the eBPF probe costs a writer: a W1-style writer (nginx access lines, 180-250 bytes, as
//! fast as it can) with the probe off, with an empty program where the probe attaches (the
//! floor: the kernel's own cost of a program on `sys_exit`), and with the probe on, in
//! alternating phases of one run.
//!
//! The writer runs on the calling thread and its CPU time is that thread's
//! (`CLOCK_THREAD_CPUTIME_ID`): the probe's programs run in the writer's syscalls, so that is
//! where their cost shows, steadier than wall time on a busy machine. The probe is loaded in this
//! process with the daemon's defaults (attachment, batch window), watching the file's device,
//! and drained by a thread as the daemon's `voltail-probe` thread does; writes by this process
//! are reported (nothing is ignored), so the writer pays for events and wake-ups as a pod would.
//!
//! Two writer styles: one `write(2)` per line (unbuffered loggers) and 64 KiB writes (buffered
//! ones). The file is rewound every 16 MiB so it stays in the page cache.
//!
//! It does not run a collector: the collector's own CPU with the probe on is W3's business.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use voltail_ebpf::{Probe, ProbeOptions};

use crate::nginx::{LineGen, LineId};
use crate::workload::now_ms;

/// Bytes per write of the buffered writer.
pub const BUFFERED: usize = 64 << 10;
/// The file is rewound past this size.
const REWIND_AT: u64 = 16 << 20;

/// How the writer issues its lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// One `write` per line.
    LinePerWrite,
    /// Lines gathered into [`BUFFERED`]-byte writes.
    Buffered,
}

/// Totals over the phases of one mode.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// Lines written.
    pub lines: u64,
    /// `write` calls.
    pub writes: u64,
    /// Wall time.
    pub wall: Duration,
    /// The writer thread's CPU time.
    pub cpu: Duration,
}

impl Totals {
    /// Writer CPU per line, ns.
    pub fn ns_per_line(&self) -> f64 {
        self.cpu.as_nanos() as f64 / self.lines.max(1) as f64
    }
    /// Lines per wall-clock second.
    pub fn lines_per_s(&self) -> f64 {
        self.lines as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// The probe off, an empty program in its place, and the probe on, `rounds` times each
/// (off, floor, on, off, floor, on, ..., off), `phase` per phase.
#[derive(Debug, Clone, Copy)]
pub struct Cost {
    /// Probe off.
    pub off: Totals,
    /// An empty program where the probe attaches ([`voltail_ebpf::Attach::Floor`]): the
    /// kernel's share of the cost, which any syscall-tracepoint probe pays.
    pub floor: Totals,
    /// Probe on.
    pub on: Totals,
    /// Which attachment the probe used.
    pub attach: voltail_ebpf::Attach,
    /// Events the probe delivered while on.
    pub events: u64,
    /// Median over the rounds of (probe on / probe off), each round's on phase against the
    /// off phases on either side of it, interpolated to its time: steadier than the ratio of
    /// the totals on a noisy machine, where one slow phase would move the totals' ratio by
    /// several percent, and unbiased by a steady drift of the machine's speed.
    pub on_ratio: f64,
    /// The same for the empty program.
    pub floor_ratio: f64,
}

/// The median of `v` (NaN for none).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Why the probe cannot run here, or `None` when it loads.
pub fn unavailable() -> Option<String> {
    if !voltail_ebpf::COMPILED_IN {
        return Some("the probe is compiled out (no clang at build time)".into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    match Probe::load(&ProbeOptions::default()) {
        Ok(_) => None,
        Err(e) => Some(format!("{:#}", anyhow::Error::new(e))),
    }
}

/// Measures `style` in `dir` (the file `probe-cost.log` there).
pub fn measure(dir: &Path, style: Style, phase: Duration, rounds: usize) -> Result<Cost> {
    let path = dir.join("probe-cost.log");
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    let dev = file.metadata()?.dev();
    let mut gen = LineGen::new(7);
    let mut off = Totals::default();
    let mut floor = Totals::default();
    let mut on = Totals::default();
    let mut events = 0;
    let mut attach = voltail_ebpf::Attach::Auto;
    // Warm the page cache and the allocator; not counted.
    write_phase(&file, &mut gen, style, phase / 4)?;
    // Each round is off, floor, on, and the next round's off (one more at the end) closes it:
    // the writer's cost without the probe at the floor's and the on phase's times is
    // interpolated between the two off phases around them ([`against_off`]), so a machine that
    // speeds up or slows down steadily through a round biases neither ratio.
    let mut phases = Vec::with_capacity(rounds);
    let mut this_off = write_phase(&file, &mut gen, style, phase)?;
    add(&mut off, this_off);
    for _ in 0..rounds {
        let empty = Probe::load(&ProbeOptions {
            devices: vec![dev],
            attach: voltail_ebpf::Attach::Floor,
            ..ProbeOptions::default()
        })
        .context("loading the empty program")?;
        let this_floor = write_phase(&file, &mut gen, style, phase)?;
        add(&mut floor, this_floor);
        drop(empty);
        let probe = Probe::load(&ProbeOptions {
            devices: vec![dev],
            ..ProbeOptions::default()
        })
        .context("loading the probe")?;
        attach = probe.attach_kind();
        let drain = Drain::start(probe);
        std::thread::sleep(Duration::from_millis(50));
        let this_on = write_phase(&file, &mut gen, style, phase)?;
        add(&mut on, this_on);
        events += drain.stop();
        let next_off = write_phase(&file, &mut gen, style, phase)?;
        add(&mut off, next_off);
        phases.push([this_off, this_floor, this_on, next_off].map(|t| t.ns_per_line()));
        this_off = next_off;
    }
    let (on_ratios, floor_ratios): (Vec<f64>, Vec<f64>) =
        phases.iter().map(|p| against_off(*p)).unzip();
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(Cost {
        off,
        floor,
        on,
        attach,
        events,
        on_ratio: median(on_ratios),
        floor_ratio: median(floor_ratios),
    })
}

/// One round's (on, floor) ratios from its phases' CPU per line, `[off, floor, on, next off]`,
/// each against the off cost interpolated to its own time (the phases are equally long): a
/// steady drift through the round cancels out.
fn against_off([off, floor, on, next_off]: [f64; 4]) -> (f64, f64) {
    let off_at = |k: f64| off + (next_off - off) * k / 3.0;
    (on / off_at(2.0), floor / off_at(1.0))
}

fn add(t: &mut Totals, p: Totals) {
    t.lines += p.lines;
    t.writes += p.writes;
    t.wall += p.wall;
    t.cpu += p.cpu;
}

/// Writes lines as fast as it can for `phase`.
fn write_phase(
    file: &std::fs::File,
    gen: &mut LineGen,
    style: Style,
    phase: Duration,
) -> Result<Totals> {
    let fd = file.as_raw_fd();
    let mut buf = Vec::with_capacity(BUFFERED + 512);
    let mut t = Totals::default();
    let mut offset = 0u64;
    let cpu0 = thread_cpu();
    let start = Instant::now();
    let end = start + phase;
    let mut write = |buf: &[u8], t: &mut Totals| -> Result<()> {
        // SAFETY: `buf` is a live buffer the kernel only reads; `fd` is open for writing.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n != buf.len() as isize {
            bail!("short write: {n}: {}", std::io::Error::last_os_error());
        }
        t.writes += 1;
        offset += buf.len() as u64;
        if offset >= REWIND_AT {
            // SAFETY: lseek on an open fd.
            unsafe { libc::lseek(fd, 0, libc::SEEK_SET) };
            offset = 0;
        }
        Ok(())
    };
    while Instant::now() < end {
        // 64 lines between clock reads: enough to make the check free, few enough to stop on time.
        for _ in 0..64 {
            gen.line(
                LineId {
                    file: 0,
                    seq: t.lines,
                },
                now_ms(),
                &mut buf,
            );
            t.lines += 1;
            match style {
                Style::LinePerWrite => {
                    write(&buf, &mut t)?;
                    buf.clear();
                }
                Style::Buffered if buf.len() >= BUFFERED => {
                    write(&buf, &mut t)?;
                    buf.clear();
                }
                Style::Buffered => {}
            }
        }
    }
    if !buf.is_empty() {
        write(&buf, &mut t)?;
    }
    t.wall = start.elapsed();
    t.cpu = thread_cpu() - cpu0;
    Ok(t)
}

/// The daemon's drain loop, reduced to counting.
struct Drain {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

impl Drain {
    fn start(mut probe: Probe) -> Drain {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut events = 0u64;
            let mut buf = Vec::with_capacity(4096);
            while !s.load(Ordering::Relaxed) {
                buf.clear();
                if probe.poll(Duration::from_millis(100), &mut buf).is_err() {
                    break;
                }
                events += buf.len() as u64;
            }
            events
        });
        Drain { stop, handle }
    }

    /// Stops the thread (the probe is detached as it ends); returns the events it drained.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or(0)
    }
}

fn thread_cpu() -> Duration {
    // SAFETY: a zeroed timespec is valid; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is valid for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::{against_off, median};

    #[test]
    fn a_steady_drift_through_a_round_cancels_out() {
        // The machine slows by 3 % per phase; the probe costs 2 %, the floor 1 %.
        let off = |k: f64| 100.0 * (1.0 + 0.03 * k);
        let (on, floor) = against_off([off(0.0), off(1.0) * 1.01, off(2.0) * 1.02, off(3.0)]);
        assert!((on - 1.02).abs() < 1e-9, "{on}");
        assert!((floor - 1.01).abs() < 1e-9, "{floor}");
        // Against the first off phase alone, as before, the 2 % read as 8 %.
        assert!((off(2.0) * 1.02 / off(0.0) - 1.0) > 0.07);
    }

    #[test]
    fn the_median_ignores_one_outlying_round() {
        assert_eq!(median(vec![1.02, 1.60, 1.01]), 1.02);
        assert_eq!(median(vec![1.0, 3.0, 2.0, 4.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
