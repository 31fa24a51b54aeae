//! voltail's eBPF write-event probe: tells the daemon, within milliseconds, that a process on this
//! node wrote to a file on one of the watched filesystems.
//!
//! The kernel half is `src/probe.bpf.c` (CO-RE C, compiled by `build.rs` with clang and embedded
//! here). It sees the `write`, `writev`, `pwrite64`, `pwritev` and `pwritev2` syscalls (one
//! `tp_btf` program at the raw `sys_exit` tracepoint, or the per-syscall tracepoints), keeps
//! only regular files on watched devices, skips the collector's own process, and sends a
//! [`WriteEvent`] per successful call through a ring buffer, except that a write to a file that
//! already has an unread event from the same process (and CPU) is folded into it.
//!
//! The user half is [`Probe`]: [`Probe::load`] loads and attaches the object (`tp_btf`, else the
//! syscall tracepoints, mounting tracefs if needed), [`Probe::poll`] waits on the ring buffer and
//! drains it, [`Probe::set_devices`] changes the watched devices, [`Probe::lost`] counts events
//! the kernel dropped because the ring buffer was full. [`dev`] converts between the kernel's
//! `dev_t` and the `st_dev` that `stat` shows.
//!
//! What it deliberately does not do: decide what to read (the daemon turns events into tail
//! hints), or see writes that bypass those syscalls (mmap, io_uring, splice, other nodes). See
//! `README.md` beside this crate for why polling stays on.

pub mod dev;
mod loader;
mod ring;

use std::time::Duration;

/// Whether the BPF object was compiled into this build (clang was found at build time).
pub const COMPILED_IN: bool = cfg!(voltail_probe);

/// The error and its sources, `: `-joined (a verifier log or an errno is in a source): what a
/// log line or a test failure should show of a [`ProbeError`].
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// One successful write by a process on this node to a regular file on a watched device.
///
/// Same layout as `struct write_event` in `probe.bpf.c`. Once returned by [`Probe::poll`], `dev`
/// is in the user-space `st_dev` encoding (as `statx`/`libc::makedev` give it).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WriteEvent {
    /// Device of the file, as `st_dev`.
    pub dev: u64,
    /// Inode number of the file.
    pub ino: u64,
    /// Bytes the call that produced the event wrote (its return value); writes folded into the
    /// event afterwards are not added (see [`Probe::coalesced`]).
    pub bytes: u64,
    /// Process id (thread-group id) of the writer.
    pub pid: u32,
    /// Padding, always zero.
    pub _pad: u32,
    /// cgroup v2 id of the writer (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// Inode number of the directory the file was opened in (its dentry's parent; a rename
    /// since may have moved it), on the same device.
    pub dir_ino: u64,
}

/// How to attach the programs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Attach {
    /// [`Attach::SysExit`]; the syscall tracepoints (mounting tracefs if it is not mounted) when
    /// that fails.
    #[default]
    Auto,
    /// Only the syscall tracepoints (`syscalls/sys_{enter,exit}_*`).
    Tracepoints,
    /// Only the `tp_btf` `sys_enter`/`sys_exit` raw tracepoints (x86_64).
    TpBtf,
    /// One `tp_btf` program on the raw `sys_exit` tracepoint, doing all the work at exit
    /// (x86_64 and arm64).
    SysExit,
    /// Measurement only: an empty `tp_btf` program on the raw `sys_exit` tracepoint, reporting
    /// nothing. What it costs a writer is the floor under [`Attach::SysExit`]'s cost: the
    /// kernel's share of any syscall-tracepoint probe.
    Floor,
}

/// Default of [`ProbeOptions::batch_window`].
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(10);

/// Default of [`ProbeOptions::ring_bytes`]: 1 MiB, about 21,000 unread events.
pub const DEFAULT_RING_BYTES: u32 = 1 << 20;

/// What to watch.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// `st_dev` of the watched filesystems; writes elsewhere are filtered out in the kernel.
    pub devices: Vec<u64>,
    /// Process id whose writes are never reported (the collector's own).
    pub ignore_pid: u32,
    /// Attachment flavour; [`Attach::Auto`] unless testing the fallback.
    pub attach: Attach,
    /// After a [`Probe::poll`] that returned events, the next one gathers events for at least
    /// this long before returning. Bounds the reader's wake-ups (and the writers' cost of waking
    /// it) to one per window under a steady write load; a write after a quiet spell is still
    /// delivered at once. Zero wakes per event.
    pub batch_window: Duration,
    /// Size of the ring buffer in bytes: a power of two, at least a page. Each event takes 48.
    pub ring_bytes: u32,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            devices: Vec::new(),
            ignore_pid: 0,
            attach: Attach::Auto,
            batch_window: DEFAULT_BATCH_WINDOW,
            ring_bytes: DEFAULT_RING_BYTES,
        }
    }
}

/// Why the probe cannot run, or failed while running.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The build had no clang, so there is no BPF object to load.
    #[error("the probe is compiled out: clang was not found when voltail was built")]
    NotCompiledIn,
    /// The process may not load BPF programs.
    #[error("no privilege to load eBPF programs: {0}")]
    NoPrivilege(String),
    /// The kernel exposes no BTF, which CO-RE relocation needs.
    #[error("no kernel BTF at {path}: {source}")]
    NoBtf {
        /// Where the BTF was looked for.
        path: &'static str,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// Neither the `tp_btf` program nor tracefs (for the syscall tracepoints) is usable.
    #[error("no tp_btf and no tracefs: {0}")]
    NoTracefs(String),
    /// The object or one of its programs failed to load (the verifier log is in the source).
    #[error("loading the eBPF {what} failed")]
    Load {
        /// The object or program that failed.
        what: String,
        /// The loader's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A program loaded but could not be attached.
    #[error("attaching eBPF program {program} failed")]
    Attach {
        /// The program's name in `probe.bpf.c`.
        program: &'static str,
        /// The loader's error.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map was missing, of the wrong type, or an operation on it failed.
    #[error("eBPF map {map}: {what}")]
    Map {
        /// The map's name in `probe.bpf.c`.
        map: &'static str,
        /// What was done with it.
        what: &'static str,
        /// The loader's error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The thread that drains the ring buffer could not be started.
    #[error("starting the probe's drain thread failed")]
    Thread(#[source] std::io::Error),
}

/// A loaded and attached probe. Dropping it detaches the programs and frees the maps.
#[derive(Debug)]
pub struct Probe {
    inner: loader::Loaded,
}

impl Probe {
    /// Loads the embedded BPF object, fills its maps from `opts` and attaches its programs.
    pub fn load(opts: &ProbeOptions) -> Result<Probe, ProbeError> {
        Ok(Probe {
            inner: loader::Loaded::load(opts)?,
        })
    }

    /// Replaces the set of watched devices (`st_dev` values).
    pub fn set_devices(&mut self, devices: &[u64]) -> Result<(), ProbeError> {
        self.inner.set_devices(devices)
    }

    /// Stops writes to inode `ino` of device `st_dev` from sending events for `span`: a file
    /// the daemon does not collect. Later calls for the same inode replace the span; the map
    /// holds 16,384 inodes and forgets the least used beyond that.
    pub fn mute(&mut self, st_dev: u64, ino: u64, span: Duration) -> Result<(), ProbeError> {
        self.inner.mute(st_dev, ino, span)
    }

    /// Waits up to `timeout` for events, then appends every available one to `out`.
    ///
    /// Returns as soon as at least one event is there, except within
    /// [`ProbeOptions::batch_window`] of the previous call that returned events, where it first
    /// sleeps out the window. An interrupted wait returns `Ok`.
    pub fn poll(&mut self, timeout: Duration, out: &mut Vec<WriteEvent>) -> Result<(), ProbeError> {
        self.inner.poll(timeout, out)
    }

    /// Events dropped in the kernel because the ring buffer was full, since load.
    pub fn lost(&self) -> Result<u64, ProbeError> {
        self.inner.lost()
    }

    /// Writes folded into an event that was still unread (same file, same process, same CPU),
    /// since load. They cost no ring-buffer space and need no event: the daemon reads the file
    /// when the unread event arrives.
    pub fn coalesced(&self) -> Result<u64, ProbeError> {
        self.inner.coalesced()
    }

    /// Which attachment flavour is in use.
    pub fn attach_kind(&self) -> Attach {
        self.inner.attach_kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn write_event_layout_matches_the_c_struct() {
        assert_eq!(size_of::<WriteEvent>(), 48);
        assert_eq!(std::mem::align_of::<WriteEvent>(), 8);
        assert_eq!(offset_of!(WriteEvent, dev), 0);
        assert_eq!(offset_of!(WriteEvent, ino), 8);
        assert_eq!(offset_of!(WriteEvent, bytes), 16);
        assert_eq!(offset_of!(WriteEvent, pid), 24);
        assert_eq!(offset_of!(WriteEvent, _pad), 28);
        assert_eq!(offset_of!(WriteEvent, cgroup_id), 32);
        assert_eq!(offset_of!(WriteEvent, dir_ino), 40);
    }

    #[test]
    fn load_without_the_object_is_not_compiled_in() {
        if COMPILED_IN {
            return;
        }
        let err = Probe::load(&ProbeOptions::default()).expect_err("no object to load");
        assert!(matches!(err, ProbeError::NotCompiledIn), "{err}");
    }

    #[test]
    fn not_compiled_in_says_why() {
        let msg = ProbeError::NotCompiledIn.to_string();
        assert!(msg.contains("clang"), "{msg}");
    }
}
