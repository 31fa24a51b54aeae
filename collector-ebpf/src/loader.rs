//! Loads the embedded BPF object with aya, attaches it, and drains its ring buffer.
//!
//! Attachment prefers one `tp_btf` program on the raw `sys_exit` tracepoint, which does all the
//! work at exit and needs only BTF (the cheapest per write, measured). When that cannot load it
//! falls back to the per-syscall tracepoints (an enter and an exit program per write call), looked
//! up through tracefs, which this mounts on `/sys/kernel/tracing` when it is missing (the
//! collector runs privileged). The `tp_btf` enter+exit pair is kept for measurement and tests.
//! It does not interpret events beyond converting `dev`; that is the daemon's job.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use aya::programs::{BtfTracePoint, TracePoint};
use aya::{Btf, Ebpf, EbpfLoader};

use crate::ring::Ring;
use crate::{dev, Attach, ProbeError, ProbeOptions, WriteEvent};

/// The BPF object `build.rs` compiled, or `None` when clang was missing.
#[cfg(voltail_probe)]
static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/probe.bpf.o"
)));
#[cfg(not(voltail_probe))]
static OBJECT: Option<&[u8]> = None;

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
const TRACEFS_MOUNT: &str = "/sys/kernel/tracing";
const TRACEFS_PATHS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Program name in `probe.bpf.c` -> tracepoint in the `syscalls` category. Exits come first:
/// once an enter is attached, every write it marks in flight has its exit attached too, so no
/// thread keeps a stale mark that a later exit would report.
const TRACEPOINTS: [(&str, &str); 10] = [
    ("voltail_exit_write", "sys_exit_write"),
    ("voltail_exit_writev", "sys_exit_writev"),
    ("voltail_exit_pwrite64", "sys_exit_pwrite64"),
    ("voltail_exit_pwritev", "sys_exit_pwritev"),
    ("voltail_exit_pwritev2", "sys_exit_pwritev2"),
    ("voltail_enter_write", "sys_enter_write"),
    ("voltail_enter_writev", "sys_enter_writev"),
    ("voltail_enter_pwrite64", "sys_enter_pwrite64"),
    ("voltail_enter_pwritev", "sys_enter_pwritev"),
    ("voltail_enter_pwritev2", "sys_enter_pwritev2"),
];

/// Program name in `probe.bpf.c` -> `tp_btf` raw tracepoint, for [`Attach::SysExit`].
const BTF_EXIT_ONLY: [(&str, &str); 1] = [("voltail_btf_exit_only", "sys_exit")];

/// Program name in `probe.bpf.c` -> `tp_btf` raw tracepoint, for [`Attach::Floor`].
const BTF_FLOOR: [(&str, &str); 1] = [("voltail_btf_floor", "sys_exit")];

/// Program name in `probe.bpf.c` -> `tp_btf` raw tracepoint, for [`Attach::TpBtf`].
/// Exit first, as for [`TRACEPOINTS`].
const BTF_TRACEPOINTS: [(&str, &str); 2] = [
    ("voltail_btf_exit", "sys_exit"),
    ("voltail_btf_enter", "sys_enter"),
];

/// Upper bound of events taken in one drain, so a writer faster than the reader cannot keep
/// `poll` from returning.
const MAX_DRAIN: usize = 65_536;

/// `struct probe_config` in `probe.bpf.c`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct ProbeConfig {
    ignore_tgid: u32,
    _pad: u32,
}

// SAFETY: `ProbeConfig` is `repr(C)`, made of plain integers with no padding bytes (4 + 4), so
// every bit pattern is valid and it can be copied to and from the kernel byte for byte.
unsafe impl aya::Pod for ProbeConfig {}

/// Key of the `muted` map. Keep in step with `struct mute_key` in probe.bpf.c.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct MuteKey {
    /// Kernel dev_t, as in `watched_devs`.
    dev: u64,
    ino: u64,
}

// SAFETY: `MuteKey` is `repr(C)`, two u64s with no padding, so every bit pattern is valid and
// it can be copied to and from the kernel byte for byte.
unsafe impl aya::Pod for MuteKey {}

/// The loaded object and the maps user space works with.
pub(crate) struct Loaded {
    /// Owns the programs and their links; dropping it detaches them.
    ebpf: Ebpf,
    events: Ring,
    watched: HashMap<MapData, u32, u8>,
    muted: HashMap<MapData, MuteKey, u64>,
    lost: PerCpuArray<MapData, u64>,
    coalesced: PerCpuArray<MapData, u64>,
    attach: Attach,
    batch_window: Duration,
    /// When the last drain that found events ended.
    last_batch: Option<Instant>,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded")
            .field("attach", &self.attach)
            .finish_non_exhaustive()
    }
}

impl Loaded {
    pub(crate) fn load(opts: &ProbeOptions) -> Result<Loaded, ProbeError> {
        let object = OBJECT.ok_or(ProbeError::NotCompiledIn)?;
        check_privilege()?;
        if let Err(source) = std::fs::metadata(BTF_PATH) {
            return Err(ProbeError::NoBtf {
                path: BTF_PATH,
                source,
            });
        }
        // aya has no user-space type for task storage (`pending`), which only the kernel side
        // uses; this lets the loader create it anyway.
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let ring_bytes = opts.ring_bytes;
        if !ring_bytes.is_power_of_two() || !u32::try_from(page).is_ok_and(|p| ring_bytes >= p) {
            return Err(ProbeError::Map {
                map: "events",
                what: "ring_bytes must be a power of two of at least a page",
                source: None,
            });
        }
        let mut ebpf = EbpfLoader::new()
            .allow_unsupported_maps()
            .map_max_entries("events", ring_bytes)
            .load(object)
            .map_err(|e| load_error("object", e))?;

        // The configuration and the device filter go in before anything is attached, so the
        // first event already obeys them.
        {
            let map = ebpf.map_mut("config").ok_or_else(|| missing("config"))?;
            let mut config: Array<&mut MapData, ProbeConfig> =
                Array::try_from(map).map_err(|e| map_error("config", "has the wrong type", e))?;
            let value = ProbeConfig {
                ignore_tgid: opts.ignore_pid,
                _pad: 0,
            };
            config
                .set(0, value, 0)
                .map_err(|e| map_error("config", "setting the ignored pid failed", e))?;
        }
        let events = ebpf.take_map("events").ok_or_else(|| missing("events"))?;
        let Map::RingBuf(events) = events else {
            return Err(ProbeError::Map {
                map: "events",
                what: "is not a ring buffer",
                source: None,
            });
        };
        let events = Ring::new(events, ring_bytes)
            .map_err(|e| map_error("events", "mapping the ring buffer failed", e))?;
        let watched = ebpf
            .take_map("watched_devs")
            .ok_or_else(|| missing("watched_devs"))?;
        let watched = HashMap::try_from(watched)
            .map_err(|e| map_error("watched_devs", "has the wrong type", e))?;
        let muted = ebpf.take_map("muted").ok_or_else(|| missing("muted"))?;
        let muted =
            HashMap::try_from(muted).map_err(|e| map_error("muted", "has the wrong type", e))?;
        let lost = ebpf.take_map("lost").ok_or_else(|| missing("lost"))?;
        let lost =
            PerCpuArray::try_from(lost).map_err(|e| map_error("lost", "has the wrong type", e))?;
        let coalesced = ebpf
            .take_map("coalesced")
            .ok_or_else(|| missing("coalesced"))?;
        let coalesced = PerCpuArray::try_from(coalesced)
            .map_err(|e| map_error("coalesced", "has the wrong type", e))?;

        let mut loaded = Loaded {
            ebpf,
            events,
            watched,
            muted,
            lost,
            coalesced,
            attach: opts.attach,
            batch_window: opts.batch_window,
            last_batch: None,
        };
        loaded.set_devices(&opts.devices)?;
        loaded.attach = loaded.attach_programs(opts.attach)?;
        Ok(loaded)
    }

    fn attach_programs(&mut self, mode: Attach) -> Result<Attach, ProbeError> {
        match mode {
            Attach::Tracepoints => {
                ensure_tracefs().map_err(ProbeError::NoTracefs)?;
                self.attach_tracepoints()?;
                Ok(Attach::Tracepoints)
            }
            Attach::TpBtf | Attach::SysExit | Attach::Floor => {
                let programs: &[(&'static str, &str)] = match mode {
                    Attach::TpBtf => &BTF_TRACEPOINTS,
                    Attach::Floor => &BTF_FLOOR,
                    _ => &BTF_EXIT_ONLY,
                };
                self.attach_tp_btf(programs).map_err(|e| match e {
                    BtfFallback::Unavailable(why) => ProbeError::NoTracefs(why),
                    BtfFallback::Failed(e) => e,
                })?;
                Ok(mode)
            }
            // The exit-only program first: the cheapest per write (see README.md, *Cost*) and
            // it needs no tracefs. The syscall tracepoints where it cannot load (a kernel
            // whose raw tracepoints or pt_regs BTF differ, an architecture without it).
            Attach::Auto => match self.attach_tp_btf(&BTF_EXIT_ONLY) {
                Ok(()) => Ok(Attach::SysExit),
                Err(btf) => {
                    let btf = match btf {
                        BtfFallback::Unavailable(why) => why,
                        BtfFallback::Failed(e) => crate::error_chain(&e),
                    };
                    match ensure_tracefs() {
                        Ok(()) => {
                            self.attach_tracepoints()?;
                            tracing::info!(reason = %btf, "probe attached through the syscall tracepoints: tp_btf failed");
                            Ok(Attach::Tracepoints)
                        }
                        Err(tracefs) => Err(ProbeError::NoTracefs(format!("{btf}; {tracefs}"))),
                    }
                }
            },
        }
    }

    fn attach_tracepoints(&mut self) -> Result<(), ProbeError> {
        for (program, tracepoint) in TRACEPOINTS {
            let prog: &mut TracePoint = self
                .ebpf
                .program_mut(program)
                .ok_or_else(|| missing_program(program))?
                .try_into()
                .map_err(|e| load_error(program, e))?;
            prog.load().map_err(|e| load_error(program, e))?;
            prog.attach("syscalls", tracepoint)
                .map_err(|source| ProbeError::Attach { program, source })?;
        }
        Ok(())
    }

    fn attach_tp_btf(&mut self, programs: &[(&'static str, &str)]) -> Result<(), BtfFallback> {
        if programs
            .iter()
            .any(|(program, _)| self.ebpf.program(program).is_none())
        {
            return Err(BtfFallback::Unavailable(
                "the tp_btf programs exist only on x86_64 and arm64".to_string(),
            ));
        }
        let btf = Btf::from_sys_fs()
            .map_err(|e| BtfFallback::Unavailable(format!("reading kernel BTF failed: {e}")))?;
        for &(program, tracepoint) in programs {
            let prog: &mut BtfTracePoint = self
                .ebpf
                .program_mut(program)
                .ok_or_else(|| BtfFallback::Failed(missing_program(program)))?
                .try_into()
                .map_err(|e| BtfFallback::Failed(load_error(program, e)))?;
            prog.load(tracepoint, &btf)
                .map_err(|e| BtfFallback::Failed(load_error(program, e)))?;
            prog.attach()
                .map_err(|source| BtfFallback::Failed(ProbeError::Attach { program, source }))?;
        }
        Ok(())
    }

    pub(crate) fn set_devices(&mut self, devices: &[u64]) -> Result<(), ProbeError> {
        let mut wanted = BTreeSet::new();
        for &st_dev in devices {
            match dev::kernel_from_st_dev(st_dev) {
                Some(kdev) => {
                    wanted.insert(kdev);
                }
                None => tracing::warn!(
                    st_dev,
                    "device number does not fit a kernel dev_t, not watched"
                ),
            }
        }
        let current = self
            .watched
            .keys()
            .collect::<Result<Vec<u32>, _>>()
            .map_err(|e| map_error("watched_devs", "listing the watched devices failed", e))?;
        for kdev in current.iter().filter(|k| !wanted.contains(k)) {
            self.watched
                .remove(kdev)
                .map_err(|e| map_error("watched_devs", "removing a device failed", e))?;
        }
        for kdev in wanted {
            self.watched
                .insert(kdev, 1, 0)
                .map_err(|e| map_error("watched_devs", "adding a device failed", e))?;
        }
        Ok(())
    }

    pub(crate) fn poll(
        &mut self,
        timeout: Duration,
        out: &mut Vec<WriteEvent>,
    ) -> Result<(), ProbeError> {
        // Within the batch window after a drain that found events, sleep out the rest of the
        // window instead of waiting on the fd: the kernel wakes a waiting reader for the first
        // record after it caught up, so a reader that wakes per event costs the writer a
        // wake-up per write. Events gather meanwhile and come in one drain.
        if let Some(last) = self.last_batch {
            let rest = self.batch_window.saturating_sub(last.elapsed());
            if !rest.is_zero() {
                std::thread::sleep(rest.min(timeout));
            }
        }
        if self.drain(out) > 0 {
            self.last_batch = Some(Instant::now());
            return Ok(());
        }
        let mut pfd = libc::pollfd {
            fd: self.events.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `pfd` is a valid, initialised pollfd that outlives the call and nfds is 1; the
        // fd belongs to `self.events`, which stays open for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, millis) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(map_error(
                "events",
                "waiting on the ring buffer failed",
                err,
            ));
        }
        if self.drain(out) > 0 {
            self.last_batch = Some(Instant::now());
        }
        Ok(())
    }

    /// Moves the available events into `out`; returns how many.
    fn drain(&mut self, out: &mut Vec<WriteEvent>) -> usize {
        self.events.drain(MAX_DRAIN, |record| {
            if record.len() < std::mem::size_of::<WriteEvent>() {
                // Cannot happen with our program; skip rather than read past the record.
                return;
            }
            // SAFETY: the record holds at least size_of::<WriteEvent>() bytes, written by the BPF
            // program as a `struct write_event`, whose layout `WriteEvent` mirrors (a unit test
            // checks it). Every bit pattern is a valid `WriteEvent` (plain integers), and
            // `read_unaligned` makes no assumption about the record's alignment.
            let mut event: WriteEvent =
                unsafe { std::ptr::read_unaligned(record.as_ptr().cast::<WriteEvent>()) };
            // The program stores the kernel's 32-bit dev_t zero-extended.
            event.dev = dev::st_dev_from_kernel(event.dev as u32);
            out.push(event);
        })
    }

    pub(crate) fn mute(&mut self, st_dev: u64, ino: u64, span: Duration) -> Result<(), ProbeError> {
        let Some(kdev) = dev::kernel_from_st_dev(st_dev) else {
            // Not a device the probe can watch either: nothing of it comes to mute.
            return Ok(());
        };
        let until =
            monotonic_ns().saturating_add(u64::try_from(span.as_nanos()).unwrap_or(u64::MAX));
        self.muted
            .insert(
                MuteKey {
                    dev: u64::from(kdev),
                    ino,
                },
                until,
                0,
            )
            .map_err(|e| map_error("muted", "muting an inode failed", e))
    }

    pub(crate) fn lost(&self) -> Result<u64, ProbeError> {
        let values = self
            .lost
            .get(&0, 0)
            .map_err(|e| map_error("lost", "reading the drop counters failed", e))?;
        Ok(values.iter().sum())
    }

    pub(crate) fn coalesced(&self) -> Result<u64, ProbeError> {
        let values = self
            .coalesced
            .get(&0, 0)
            .map_err(|e| map_error("coalesced", "reading the counters failed", e))?;
        Ok(values.iter().sum())
    }

    pub(crate) fn attach_kind(&self) -> Attach {
        self.attach
    }
}

/// Why the `tp_btf` fallback did not attach: it cannot exist here, or it failed.
enum BtfFallback {
    Unavailable(String),
    Failed(ProbeError),
}

/// Checks the effective capabilities: loading tracing programs needs CAP_BPF and CAP_PERFMON, or
/// CAP_SYS_ADMIN. When `/proc/self/status` is unreadable the load itself will tell.
fn check_privilege() -> Result<(), ProbeError> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Ok(());
    };
    let Some(cap_eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    else {
        return Ok(());
    };
    let has = |cap: u32| cap_eff & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    Err(ProbeError::NoPrivilege(format!(
        "the process lacks CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN); effective capabilities are {cap_eff:#x}"
    )))
}

/// Makes the `syscalls` tracepoints reachable through tracefs, mounting it if needed.
/// The error says why they are not.
fn ensure_tracefs() -> Result<(), String> {
    let has_syscalls = || {
        TRACEFS_PATHS
            .iter()
            .any(|p| Path::new(p).join("events/syscalls").is_dir())
    };
    if has_syscalls() {
        return Ok(());
    }
    let mounted = TRACEFS_PATHS
        .iter()
        .any(|p| Path::new(p).join("events").is_dir());
    if !mounted {
        mount_tracefs().map_err(|e| {
            format!("tracefs is not mounted and mounting it on {TRACEFS_MOUNT} failed: {e}")
        })?;
        tracing::info!(path = TRACEFS_MOUNT, "mounted tracefs for the probe");
        if has_syscalls() {
            return Ok(());
        }
    }
    Err(
        "tracefs has no syscalls tracepoints (kernel built without CONFIG_FTRACE_SYSCALLS)"
            .to_string(),
    )
}

fn mount_tracefs() -> io::Result<()> {
    let source = c"tracefs";
    let target = c"/sys/kernel/tracing";
    // SAFETY: all pointers are NUL-terminated C string literals that live for the whole call;
    // `data` may be null for tracefs.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn load_error(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> ProbeError {
    ProbeError::Load {
        what: what.to_string(),
        source: Box::new(e),
    }
}

fn map_error(
    map: &'static str,
    what: &'static str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> ProbeError {
    ProbeError::Map {
        map,
        what,
        source: Some(Box::new(e)),
    }
}

fn missing(map: &'static str) -> ProbeError {
    ProbeError::Map {
        map,
        what: "is missing from the object",
        source: None,
    }
}

fn missing_program(program: &str) -> ProbeError {
    ProbeError::Load {
        what: program.to_string(),
        source: "the program is missing from the object".into(),
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of the kernel's `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
