//! The read-backend seam: how a poll round's `statx` and `read` calls reach the kernel.
//!
//! The tailer decides *what* to do for each due file; a [`ReadBackend`] only *does* it, for a
//! whole round at once, so that a backend can batch the calls (io_uring submits a round in one
//! `io_uring_enter`; on a network filesystem a round then costs about one round trip, not one per
//! file). A round has two phases: [`ReadBackend::stat_batch`] (the file's size through its open
//! descriptor, and what its path now names, for rotation and deletion checks), then
//! [`ReadBackend::read_batch`] for the files that grew. Backends never interpret results.
//!
//! Errors are raw `errno` values ([`Errno`]): they are data here (a vanished path is the normal
//! end of a rotation), and the tailer decides what each means.

use std::ffi::CStr;
use std::os::fd::RawFd;

/// An `errno` value from a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// The last OS error of this thread.
    pub fn last() -> Errno {
        Errno(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }
    /// As an `io::Error`, for messages.
    pub fn io(self) -> std::io::Error {
        std::io::Error::from_raw_os_error(self.0)
    }
    /// Placeholder of a result not filled in yet.
    pub const PENDING: Errno = Errno(libc::EINPROGRESS);
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.io().fmt(f)
    }
}

/// The part of `statx` the tailer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stat {
    /// `st_dev` as userspace sees it (`makedev(major, minor)`).
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Hard links; 0 once a still-open file was deleted.
    pub nlink: u64,
    /// `st_mode` (file type and permissions).
    pub mode: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Status change time, nanoseconds since the epoch (unlike the mtime, no call can set it).
    pub ctime_ns: i64,
}

impl Stat {
    /// Whether this is a regular file.
    pub fn is_file(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }
    /// Converts a `statx` result.
    pub fn from_statx(s: &libc::statx) -> Stat {
        Stat {
            dev: libc::makedev(s.stx_dev_major, s.stx_dev_minor),
            ino: s.stx_ino,
            size: s.stx_size,
            nlink: u64::from(s.stx_nlink),
            mode: u32::from(s.stx_mode),
            mtime_ns: s.stx_mtime.tv_sec * 1_000_000_000 + i64::from(s.stx_mtime.tv_nsec),
            ctime_ns: s.stx_ctime.tv_sec * 1_000_000_000 + i64::from(s.stx_ctime.tv_nsec),
        }
    }
}

/// The `statx` mask the tailer needs.
pub const STATX_MASK: u32 = libc::STATX_TYPE
    | libc::STATX_MODE
    | libc::STATX_NLINK
    | libc::STATX_INO
    | libc::STATX_SIZE
    | libc::STATX_MTIME
    | libc::STATX_CTIME;

/// One file's stat work in a round.
#[derive(Debug)]
pub struct StatOp<'a> {
    /// The open descriptor: `statx(fd, "", AT_EMPTY_PATH)`; negative to skip it (`fd_stat`
    /// then stays `Err(PENDING)`): while a path still names the file, its stat is the file's.
    pub fd: RawFd,
    /// When set, also `statx(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW)`: what the path names now.
    pub path: Option<&'a CStr>,
    /// Result for `fd` (filled by the backend).
    pub fd_stat: Result<Stat, Errno>,
    /// Result for `path` (filled by the backend; left `Err(PENDING)` when `path` is `None`).
    pub path_stat: Result<Stat, Errno>,
}

impl<'a> StatOp<'a> {
    /// A new op with pending results.
    pub fn new(fd: RawFd, path: Option<&'a CStr>) -> Self {
        StatOp {
            fd,
            path,
            fd_stat: Err(Errno::PENDING),
            path_stat: Err(Errno::PENDING),
        }
    }
}

/// One file's read in a round: `pread(fd, buf, offset)`.
#[derive(Debug)]
pub struct ReadOp<'a> {
    /// The open descriptor.
    pub fd: RawFd,
    /// File offset to read at.
    pub offset: u64,
    /// Where the bytes go; a read may return fewer bytes than its length.
    pub buf: &'a mut [u8],
    /// Bytes read, 0 at end of file (filled by the backend).
    pub result: Result<usize, Errno>,
}

/// Executes a round's calls. Implementations: `pread` (plain syscalls) and `uring` (io_uring).
pub trait ReadBackend: Send + std::fmt::Debug {
    /// Name reported in logs and `voltail_reader_backend{backend=...}`.
    fn name(&self) -> &'static str;
    /// Fills `fd_stat` (and `path_stat` where `path` is set) of every op.
    fn stat_batch(&mut self, ops: &mut [StatOp<'_>]);
    /// Fills `result` of every op.
    fn read_batch(&mut self, ops: &mut [ReadOp<'_>]);
}

/// `statx` through a descriptor, as a plain syscall.
pub fn statx_fd(fd: RawFd) -> Result<Stat, Errno> {
    statx_raw(fd, c"", libc::AT_EMPTY_PATH)
}

/// `statx` of a path without following a final symlink, as a plain syscall.
pub fn statx_path(path: &CStr) -> Result<Stat, Errno> {
    statx_raw(libc::AT_FDCWD, path, libc::AT_SYMLINK_NOFOLLOW)
}

fn statx_raw(dirfd: RawFd, path: &CStr, flags: i32) -> Result<Stat, Errno> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut sx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and outlives the call; `sx` is a valid out-pointer.
    let rc = unsafe { libc::statx(dirfd, path.as_ptr(), flags, STATX_MASK, &mut sx) };
    if rc == 0 {
        Ok(Stat::from_statx(&sx))
    } else {
        Err(Errno::last())
    }
}

/// `pread` as a plain syscall.
pub fn pread(fd: RawFd, buf: &mut [u8], offset: u64) -> Result<usize, Errno> {
    loop {
        // SAFETY: `buf` is a valid writable region of `buf.len()` bytes for the whole call.
        let n = unsafe {
            libc::pread(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                offset as libc::off_t,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = Errno::last();
        if e.0 != libc::EINTR {
            return Err(e);
        }
    }
}
