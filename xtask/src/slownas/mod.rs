//! The slow-NAS stand-in: a FUSE passthrough filesystem that adds latency, like an NFS mount.
//!
//! [`SlowNas::mount`] exposes a source directory at a mount point through `fuser` (pure-Rust
//! mount through `/dev/fuse`, so it needs root but not libfuse). `lookup`, `getattr`, `open`,
//! `read` and `readdir` each cost `latency`: the FUSE session threads only parse requests and
//! hand each one, with its reply object, to a pool of `threads` workers that sleep the latency,
//! do the real syscall and reply. That models an NFS client, which keeps dozens of RPCs in
//! flight (its slot table): many concurrent requests each take one round trip, so the
//! filesystem's latency, not the stand-in, sets the limit on a collector that issues its
//! operations concurrently, and a sequential collector pays the latency once per operation.
//!
//! Attributes are returned with TTL 0, so every `stat` reaches the filesystem and appends made
//! in the source directory (by "pods on other nodes") are visible through the mount at once;
//! names are cached for `entry_ttl` (NFS caches dentries too). Writes through the mount work
//! (create, write, truncate, rename, unlink, mkdir), without added latency.
//!
//! [`OpStats`] counts operations and, when asked, records when each file was last stat'ed or
//! read, which is how the bench measures a collector's poll round from the filesystem's side.
//!
//! [`SlowNas::faults`] injects filesystem errors while mounted (see [`faults`]): chosen
//! operations on chosen paths fail with EIO, ESTALE or any errno, and directories vanish from
//! their parent and come back, the failures a collector meets on a real NAS.
//!
//! The mount goes away when the [`SlowNas`] is dropped (lazily, and by aborting the FUSE
//! connection if something still holds files open), so a failed bench does not leave it behind.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

pub mod faults;

use self::faults::{Faults, Op};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// How the stand-in behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Added to each lookup, getattr, open, read and readdir.
    pub latency: Duration,
    /// Worker threads serving requests concurrently (an NFS client's RPC slots).
    pub threads: usize,
    /// How long the kernel may cache a name -> inode mapping.
    pub entry_ttl: Duration,
    /// Open files with `direct_io` (no page cache at all).
    pub direct_io: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            latency: Duration::from_millis(1),
            threads: 64,
            entry_ttl: Duration::from_secs(1),
            direct_io: false,
        }
    }
}

/// Operation counters, and an optional record of per-file poll times.
#[derive(Debug, Default)]
pub struct OpStats {
    /// lookups served.
    pub lookup: AtomicU64,
    /// getattrs served.
    pub getattr: AtomicU64,
    /// opens served.
    pub open: AtomicU64,
    /// reads served.
    pub read: AtomicU64,
    /// readdirs served.
    pub readdir: AtomicU64,
    /// Operations the workers hold now (waiting out the latency or being served).
    in_flight: AtomicU64,
    /// Most operations held at once since the mount or [`OpStats::reset_peak`].
    peak: AtomicU64,
    recording: AtomicBool,
    touches: Mutex<Vec<(Instant, u64)>>,
}

impl OpStats {
    /// Starts (or stops) recording each getattr/read of a regular file with its time.
    pub fn record(&self, on: bool) {
        if on {
            self.touches.lock().expect("stats lock").clear();
        }
        self.recording.store(on, Ordering::SeqCst);
    }

    /// A copy of the touches recorded so far, oldest first.
    pub fn touches(&self) -> Vec<(Instant, u64)> {
        let mut t = self.touches.lock().expect("stats lock").clone();
        t.sort_by_key(|x| x.0);
        t
    }

    /// The recorded `(time, inode)` touches, oldest first.
    pub fn take_touches(&self) -> Vec<(Instant, u64)> {
        let mut t = std::mem::take(&mut *self.touches.lock().expect("stats lock"));
        t.sort_by_key(|x| x.0);
        t
    }

    fn touch(&self, ino: u64) {
        if self.recording.load(Ordering::Relaxed) {
            self.touches
                .lock()
                .expect("stats lock")
                .push((Instant::now(), ino));
        }
    }

    /// Most operations the workers held at once since the mount or the last reset: how much
    /// concurrency the client (kernel and collector) actually achieved.
    pub fn peak_in_flight(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }

    /// Starts a new [`OpStats::peak_in_flight`] measurement.
    pub fn reset_peak(&self) {
        self.peak.store(0, Ordering::SeqCst);
    }

    fn begin(&self) {
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
    }

    fn end(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Total operations that paid the latency.
    pub fn total(&self) -> u64 {
        [
            &self.lookup,
            &self.getattr,
            &self.open,
            &self.read,
            &self.readdir,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// Poll rounds seen in a record of touches: the times it took to touch every one of `files`
/// files, one round after another, each round starting at the first touch after the previous
/// one covered every file or after a quiet gap longer than `gap`. Rounds that sleep between them are measured from their first touch;
/// rounds that run into each other as the time to cover every file once. The record usually
/// starts in the middle of a round, so the first entry spans parts of two rounds (and their
/// sleep): callers should prefer the later ones.
pub fn rounds(touches: &[(Instant, u64)], files: usize, gap: Duration) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut start: Option<Instant> = None;
    let mut prev: Option<Instant> = None;
    for &(t, ino) in touches {
        // A quiet gap is the sleep between rounds: a new round starts here.
        if prev.is_some_and(|p| t - p > gap) {
            seen.clear();
            start = None;
        }
        prev = Some(t);
        let s = *start.get_or_insert(t);
        seen.insert(ino);
        if seen.len() >= files {
            out.push(t - s);
            seen.clear();
            start = None;
        }
    }
    out
}

type Job = Box<dyn FnOnce() + Send>;

/// A directory listing taken at opendir: (inode, kind, name).
type Listing = Arc<Vec<(u64, FileType, OsString)>>;

#[derive(Debug, Default)]
struct Inodes {
    by_real: HashMap<(u64, u64), u64>,
    paths: HashMap<u64, PathBuf>,
    next: u64,
}

#[derive(Debug)]
struct Inner {
    source: PathBuf,
    opts: Options,
    inodes: Mutex<Inodes>,
    files: Mutex<HashMap<u64, Arc<File>>>,
    dirs: Mutex<HashMap<u64, Listing>>,
    next_fh: AtomicU64,
    stats: Arc<OpStats>,
    faults: Arc<Faults>,
}

fn errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn kind_of(ft: std::fs::FileType) -> FileType {
    FileType::from_std(ft).unwrap_or(FileType::RegularFile)
}

fn systime(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH
    }
}

impl Inner {
    /// The error a fault injects for `op` on the real path `path`, if any.
    fn fault(&self, op: Op, path: &Path) -> Option<Errno> {
        let rel = path.strip_prefix(&self.source).unwrap_or(path);
        self.faults.error(op, rel).map(Errno::from_i32)
    }

    /// Whether the real directory `path` is hidden by a fault.
    fn hidden(&self, path: &Path) -> bool {
        let rel = path.strip_prefix(&self.source).unwrap_or(path);
        self.faults.hidden(rel)
    }

    fn path(&self, ino: INodeNo) -> Option<PathBuf> {
        if ino.0 == 1 {
            return Some(self.source.clone());
        }
        self.inodes
            .lock()
            .expect("inode lock")
            .paths
            .get(&ino.0)
            .cloned()
    }

    /// Our inode number for a real (dev, ino), remembering `path` as its latest name.
    fn ino_for(&self, dev: u64, real: u64, path: PathBuf) -> u64 {
        let mut t = self.inodes.lock().expect("inode lock");
        let t = &mut *t;
        let ino = *t.by_real.entry((dev, real)).or_insert_with(|| {
            t.next += 1;
            t.next
        });
        t.paths.insert(ino, path);
        ino
    }

    fn attr(&self, ino: u64, m: &std::fs::Metadata) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: m.size(),
            blocks: m.blocks(),
            atime: systime(m.atime(), m.atime_nsec()),
            mtime: systime(m.mtime(), m.mtime_nsec()),
            ctime: systime(m.ctime(), m.ctime_nsec()),
            crtime: systime(m.ctime(), m.ctime_nsec()),
            kind: kind_of(m.file_type()),
            perm: (m.mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev() as u32,
            blksize: m.blksize() as u32,
            flags: 0,
        }
    }

    fn entry(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        let dir = self.path(parent).ok_or(Errno::ENOENT)?;
        let path = dir.join(name);
        if let Some(e) = self.fault(Op::Lookup, &path) {
            return Err(e);
        }
        let m = std::fs::symlink_metadata(&path).map_err(|e| errno(&e))?;
        let ino = if parent.0 == 1 && name == ".." {
            1
        } else {
            self.ino_for(m.dev(), m.ino(), path)
        };
        Ok(self.attr(ino, &m))
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn fopen_flags(&self) -> FopenFlags {
        if self.opts.direct_io {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        }
    }
}

/// The FUSE filesystem: parses requests and hands them to the worker pool.
struct SlowFs {
    inner: Arc<Inner>,
    pool: crossbeam_channel::Sender<Job>,
}

impl SlowFs {
    /// Runs `job` on a worker after the latency.
    fn slow(&self, job: impl FnOnce(&Inner) + Send + 'static) {
        let inner = self.inner.clone();
        // The workers only stop when the sender is gone, which is after the session ends.
        let _ = self.pool.send(Box::new(move || job(&inner)));
    }
}

const ATTR_TTL: Duration = Duration::ZERO;

impl Filesystem for SlowFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Let the kernel keep as many requests in flight as we have workers.
        let n = u16::try_from(self.inner.opts.threads.max(16)).unwrap_or(u16::MAX);
        let _ = config.set_max_background(n);
        let _ = config.set_congestion_threshold(n.saturating_mul(3) / 4);
        // Without this the kernel serializes lookups and listings within a directory (one
        // mutex per directory inode), which an NFS client does not: since Linux 4.7 it looks
        // up names of one directory in parallel. 2,000 pod directories under one root would
        // otherwise be looked up one at a time here and in no real deployment.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_os_string();
        self.slow(move |fs| {
            fs.stats.lookup.fetch_add(1, Ordering::Relaxed);
            match fs.entry(parent, &name) {
                Ok(attr) => {
                    reply.entry_with_ttls(&ATTR_TTL, &fs.opts.entry_ttl, &attr, Generation(0))
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.slow(move |fs| {
            fs.stats.getattr.fetch_add(1, Ordering::Relaxed);
            if let Some(e) = fs.path(ino).and_then(|p| fs.fault(Op::Getattr, &p)) {
                return reply.error(e);
            }
            let file = fh.and_then(|fh| fs.files.lock().expect("files lock").get(&fh.0).cloned());
            let m = match file {
                Some(f) => f.metadata(),
                None => match fs.path(ino) {
                    Some(p) => std::fs::symlink_metadata(p),
                    None => return reply.error(Errno::ENOENT),
                },
            };
            match m {
                Ok(m) => {
                    if m.is_file() {
                        fs.stats.touch(ino.0);
                    }
                    reply.attr(&ATTR_TTL, &fs.attr(ino.0, &m))
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let fs = &self.inner;
        let Some(path) = fs.path(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let r = (|| -> std::io::Result<std::fs::Metadata> {
            if let Some(size) = size {
                OpenOptions::new().write(true).open(&path)?.set_len(size)?;
            }
            if let Some(mode) = mode {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))?;
            }
            std::fs::symlink_metadata(&path)
        })();
        match r {
            Ok(m) => reply.attr(&ATTR_TTL, &fs.attr(ino.0, &m)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.slow(move |fs| {
            fs.stats.open.fetch_add(1, Ordering::Relaxed);
            let Some(path) = fs.path(ino) else {
                return reply.error(Errno::ENOENT);
            };
            if let Some(e) = fs.fault(Op::Open, &path) {
                return reply.error(e);
            }
            let acc = flags.0 & libc::O_ACCMODE;
            let r = OpenOptions::new()
                .read(acc == libc::O_RDONLY || acc == libc::O_RDWR)
                .write(acc == libc::O_WRONLY || acc == libc::O_RDWR)
                .append(flags.0 & libc::O_APPEND != 0)
                .custom_flags(flags.0 & libc::O_TRUNC)
                .open(&path);
            match r {
                Ok(f) => {
                    let fh = fs.new_fh();
                    fs.files.lock().expect("files lock").insert(fh, Arc::new(f));
                    reply.opened(FileHandle(fh), fs.fopen_flags());
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.slow(move |fs| {
            fs.stats.read.fetch_add(1, Ordering::Relaxed);
            fs.stats.touch(ino.0);
            if let Some(e) = fs.path(ino).and_then(|p| fs.fault(Op::Read, &p)) {
                return reply.error(e);
            }
            let Some(f) = fs.files.lock().expect("files lock").get(&fh.0).cloned() else {
                return reply.error(Errno::EBADF);
            };
            let mut buf = vec![0u8; size as usize];
            let mut got = 0;
            while got < buf.len() {
                match f.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return reply.error(errno(&e)),
                }
            }
            reply.data(&buf[..got]);
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(f) = self
            .inner
            .files
            .lock()
            .expect("files lock")
            .get(&fh.0)
            .cloned()
        else {
            return reply.error(Errno::EBADF);
        };
        // The kernel gives the offset even for O_APPEND files (it tracks the size itself);
        // write_at on an O_APPEND fd appends anyway, which is what the writer asked for.
        match f.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        let f = self
            .inner
            .files
            .lock()
            .expect("files lock")
            .get(&fh.0)
            .cloned();
        match f.map(|f| f.sync_data()) {
            Some(Err(e)) => reply.error(errno(&e)),
            _ => reply.ok(),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.inner.files.lock().expect("files lock").remove(&fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fs = &self.inner;
        let Some(path) = fs.path(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(e) = fs.fault(Op::Readdir, &path) {
            return reply.error(e);
        }
        let list = (|| -> std::io::Result<Vec<(u64, FileType, OsString)>> {
            let dev = std::fs::metadata(&path)?.dev();
            let mut v = vec![
                (ino.0, FileType::Directory, OsString::from(".")),
                (1, FileType::Directory, OsString::from("..")),
            ];
            for e in std::fs::read_dir(&path)? {
                let e = e?;
                if fs.hidden(&e.path()) {
                    continue;
                }
                let kind = e.file_type().map(kind_of).unwrap_or(FileType::RegularFile);
                let ino = fs.ino_for(dev, e.ino(), e.path());
                v.push((ino, kind, e.file_name()));
            }
            Ok(v)
        })();
        match list {
            Ok(v) => {
                let fh = fs.new_fh();
                fs.dirs.lock().expect("dirs lock").insert(fh, Arc::new(v));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.slow(move |fs| {
            fs.stats.readdir.fetch_add(1, Ordering::Relaxed);
            let Some(list) = fs.dirs.lock().expect("dirs lock").get(&fh.0).cloned() else {
                return reply.error(Errno::EBADF);
            };
            for (i, (ino, kind, name)) in list.iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.inner.dirs.lock().expect("dirs lock").remove(&fh.0);
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let fs = &self.inner;
        let Some(dir) = fs.path(parent) else {
            return reply.error(Errno::ENOENT);
        };
        let path = dir.join(name);
        let r = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .append(flags & libc::O_APPEND != 0)
            .custom_flags(flags & (libc::O_TRUNC | libc::O_EXCL))
            .mode(mode & 0o7777)
            .open(&path)
            .and_then(|f| f.metadata().map(|m| (f, m)));
        match r {
            Ok((f, m)) => {
                let ino = fs.ino_for(m.dev(), m.ino(), path);
                let fh = fs.new_fh();
                fs.files.lock().expect("files lock").insert(fh, Arc::new(f));
                let attr = fs.attr(ino, &m);
                reply.created(
                    &fs.opts.entry_ttl,
                    &attr,
                    Generation(0),
                    FileHandle(fh),
                    fs.fopen_flags(),
                );
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let fs = &self.inner;
        let Some(dir) = fs.path(parent) else {
            return reply.error(Errno::ENOENT);
        };
        let path = dir.join(name);
        let r = std::fs::create_dir(&path).and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
        });
        match r.and_then(|()| std::fs::symlink_metadata(&path)) {
            Ok(m) => {
                let ino = fs.ino_for(m.dev(), m.ino(), path);
                reply.entry(&fs.opts.entry_ttl, &fs.attr(ino, &m), Generation(0));
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.inner.path(parent) {
            Some(dir) => match std::fs::remove_file(dir.join(name)) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            },
            None => reply.error(Errno::ENOENT),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.inner.path(parent) {
            Some(dir) => match std::fs::remove_dir(dir.join(name)) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            },
            None => reply.error(Errno::ENOENT),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let fs = &self.inner;
        let (Some(a), Some(b)) = (fs.path(parent), fs.path(newparent)) else {
            return reply.error(Errno::ENOENT);
        };
        let (from, to) = (a.join(name), b.join(newname));
        match std::fs::rename(&from, &to) {
            Ok(()) => {
                if let Ok(m) = std::fs::symlink_metadata(&to) {
                    fs.ino_for(m.dev(), m.ino(), to);
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// Mount points of the stand-ins mounted now (for the bench's interrupt handler).
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Detaches every stand-in still mounted (the process is about to exit).
pub fn unmount_all() {
    for m in LIVE.lock().map(|v| v.clone()).unwrap_or_default() {
        if let Ok(c) = std::ffi::CString::new(m.as_os_str().as_bytes()) {
            // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// A mounted stand-in; unmounts when dropped.
pub struct SlowNas {
    mount: PathBuf,
    session: Option<fuser::BackgroundSession>,
    stats: Arc<OpStats>,
    faults: Arc<Faults>,
    opts: Options,
}

impl std::fmt::Debug for SlowNas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlowNas")
            .field("mount", &self.mount)
            .field("opts", &self.opts)
            .finish()
    }
}

impl SlowNas {
    /// Mounts `source` at `mount` (which must exist and be an empty directory).
    pub fn mount(source: &Path, mount: &Path, opts: Options) -> Result<SlowNas> {
        let source = source
            .canonicalize()
            .with_context(|| format!("source {}", source.display()))?;
        let mount = mount
            .canonicalize()
            .with_context(|| format!("mount point {}", mount.display()))?;
        let stats = Arc::new(OpStats::default());
        let faults = Arc::new(Faults::default());
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        for i in 0..opts.threads.max(1) {
            let rx = rx.clone();
            let latency = opts.latency;
            let stats = stats.clone();
            std::thread::Builder::new()
                .name(format!("slownas-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        stats.begin();
                        if !latency.is_zero() {
                            std::thread::sleep(latency);
                        }
                        job();
                        stats.end();
                    }
                })
                .context("spawn slownas worker")?;
        }
        let inner = Arc::new(Inner {
            source: source.clone(),
            opts: opts.clone(),
            inodes: Mutex::new(Inodes {
                next: 1,
                ..Default::default()
            }),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(0),
            stats: stats.clone(),
            faults: faults.clone(),
        });
        let fs = SlowFs { inner, pool: tx };
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            MountOption::FSName(format!("slownas:{}", source.display())),
            MountOption::Subtype("slownas".into()),
            MountOption::RW,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::CUSTOM("allow_other".into()),
        ];
        // Two session threads parse requests; the workers above do the waiting.
        cfg.n_threads = Some(2);
        cfg.clone_fd = true;
        let session = fuser::Session::new(fs, &mount, &cfg)
            .with_context(|| {
                format!(
                    "mount slownas at {} (needs root and /dev/fuse)",
                    mount.display()
                )
            })?
            .spawn()
            .context("start slownas session")?;
        if let Ok(mut v) = LIVE.lock() {
            v.push(mount.clone());
        }
        Ok(SlowNas {
            mount,
            session: Some(session),
            stats,
            faults,
            opts,
        })
    }

    /// Where it is mounted.
    pub fn mount_point(&self) -> &Path {
        &self.mount
    }

    /// Its operation counters.
    pub fn stats(&self) -> &Arc<OpStats> {
        &self.stats
    }

    /// The faults it injects: add and lift them while a collector reads the mount.
    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    /// Unmounts now, reporting errors (dropping does the same, silently).
    pub fn unmount(mut self) -> Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        if let Ok(mut v) = LIVE.lock() {
            v.retain(|m| *m != self.mount);
        }
        let minor = std::fs::metadata(&self.mount).map(|m| {
            let dev = m.dev();
            libc::minor(dev)
        });
        let c = std::ffi::CString::new(self.mount.as_os_str().as_bytes())?;
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        let rc = unsafe { libc::umount2(c.as_ptr(), 0) };
        if rc != 0 {
            // Busy (a collector still holds files open): detach the mount now and abort the
            // FUSE connection so the session threads see ENODEV and end.
            // SAFETY: as above.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            if let Ok(minor) = minor {
                let abort = format!("/sys/fs/fuse/connections/{minor}/abort");
                if !Path::new(&abort).exists() {
                    // The FUSE control filesystem is not mounted (containers often lack it):
                    // without it the session would wait for the last open file forever.
                    let (none, at, ty) = (c"none", c"/sys/fs/fuse/connections", c"fusectl");
                    // SAFETY: valid NUL-terminated strings that outlive the call; no data.
                    unsafe {
                        libc::mount(none.as_ptr(), at.as_ptr(), ty.as_ptr(), 0, std::ptr::null())
                    };
                }
                let _ = std::fs::write(abort, "1");
            }
        }
        session
            .join()
            .map_err(|e| anyhow::anyhow!("slownas session ended with {e}"))
    }
}

impl Drop for SlowNas {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            eprintln!("slownas: unmount {}: {e:#}", self.mount.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Mounting needs root and /dev/fuse; elsewhere the mount tests say so and pass, except
    /// under `CI=true`, where they must run.
    fn can_mount() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !(root && Path::new("/dev/fuse").exists()) {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(
                !ci,
                "CI=true: the FUSE tests must run, as root with /dev/fuse"
            );
            eprintln!("skipped: mounting FUSE needs root and /dev/fuse");
            return false;
        }
        true
    }

    fn errno_of<T: std::fmt::Debug>(r: std::io::Result<T>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    #[test]
    fn injected_faults_fail_reads_and_stats_and_hide_directories() {
        use super::faults::Fault;
        if !can_mount() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, mnt) = (dir.path().join("src"), dir.path().join("mnt"));
        for pod in ["pod-1", "pod-2"] {
            std::fs::create_dir_all(src.join("app").join(pod)).expect("mkdir");
            std::fs::write(src.join("app").join(pod).join("access.log"), "line\n").expect("write");
        }
        std::fs::create_dir_all(&mnt).expect("mkdir");
        let opts = Options {
            latency: Duration::ZERO,
            entry_ttl: Duration::ZERO,
            direct_io: true,
            ..Default::default()
        };
        let nas = SlowNas::mount(&src, &mnt, opts).expect("mount");
        let (p1, p2) = (
            mnt.join("app/pod-1/access.log"),
            mnt.join("app/pod-2/access.log"),
        );
        let (f1, f2) = (
            File::open(&p1).expect("open"),
            File::open(&p2).expect("open"),
        );
        let mut buf = [0u8; 16];

        // EIO on reads of one pod: the other reads on.
        let eio = nas
            .faults()
            .add(Fault::fail(&[Op::Read], "app/pod-1", libc::EIO));
        assert_eq!(errno_of(f1.read_at(&mut buf, 0)), Some(libc::EIO));
        assert_eq!(f2.read_at(&mut buf, 0).expect("other pod reads"), 5);
        assert_eq!(std::fs::metadata(&p1).expect("stat still works").len(), 5);
        nas.faults().lift(eio);
        assert_eq!(f1.read_at(&mut buf, 0).expect("read after lifting"), 5);

        // ESTALE on stats and opens: by path and by descriptor.
        let stale = nas.faults().add(Fault::fail(
            &[Op::Getattr, Op::Open],
            "app/pod-1/access.log",
            libc::ESTALE,
        ));
        assert_eq!(errno_of(std::fs::metadata(&p1)), Some(libc::ESTALE));
        assert_eq!(errno_of(f1.metadata()), Some(libc::ESTALE));
        assert_eq!(errno_of(File::open(&p1)), Some(libc::ESTALE));
        assert!(std::fs::metadata(&p2).is_ok());
        nas.faults().lift(stale);
        assert!(f1.metadata().is_ok());

        // A vanished directory: gone by name, not listed; open descriptors keep reading.
        let hide = nas.faults().add(Fault::hide("app/pod-2"));
        let names = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .expect("readdir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&mnt.join("app")), ["pod-1"]);
        assert_eq!(errno_of(std::fs::metadata(&p2)), Some(libc::ENOENT));
        assert_eq!(f2.read_at(&mut buf, 0).expect("open descriptor reads"), 5);
        nas.faults().lift(hide);
        assert_eq!(names(&mnt.join("app")), ["pod-1", "pod-2"]);
        assert!(std::fs::metadata(&p2).is_ok());
        assert!(nas.faults().injected() >= 6);

        // Unmounting with files still open detaches the mount and aborts the connection
        // (mounting the FUSE control filesystem if needed) instead of waiting for them.
        drop(nas);
        assert_eq!(errno_of(f1.read_at(&mut buf, 0)), Some(libc::ENOTCONN));
        drop((f1, f2));
    }

    #[test]
    fn passthrough_reads_sees_appends_and_unmounts_on_drop() {
        if !can_mount() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, mnt) = (dir.path().join("src"), dir.path().join("mnt"));
        std::fs::create_dir_all(src.join("app/pod")).expect("mkdir");
        std::fs::create_dir_all(&mnt).expect("mkdir");
        std::fs::write(src.join("app/pod/access.log"), "one\n").expect("write");
        let opts = Options {
            latency: Duration::from_millis(20),
            ..Default::default()
        };
        let nas = SlowNas::mount(&src, &mnt, opts).expect("mount");
        let through = mnt.join("app/pod/access.log");
        let mut f = File::open(&through).expect("open through the mount");
        let mut text = String::new();
        f.read_to_string(&mut text).expect("read");
        assert_eq!(text, "one\n");

        // An append in the source is visible through the open file and to a fresh stat.
        let mut w = OpenOptions::new()
            .append(true)
            .open(src.join("app/pod/access.log"))
            .expect("open source");
        w.write_all(b"two\n").expect("append");
        assert_eq!(std::fs::metadata(&through).expect("stat").len(), 8);
        text.clear();
        f.read_to_string(&mut text).expect("read the append");
        assert_eq!(text, "two\n");

        // Writes through the mount land in the source.
        let mut m = OpenOptions::new()
            .append(true)
            .open(&through)
            .expect("open rw");
        m.write_all(b"three\n").expect("write through");
        drop(m);
        assert_eq!(
            std::fs::read_to_string(src.join("app/pod/access.log")).expect("read"),
            "one\ntwo\nthree\n"
        );
        let names: Vec<_> = std::fs::read_dir(mnt.join("app/pod"))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["access.log"]);

        // Each operation pays the latency.
        let t = Instant::now();
        std::fs::metadata(&through).expect("stat");
        assert!(
            t.elapsed() >= Duration::from_millis(20),
            "{:?}",
            t.elapsed()
        );
        assert!(nas.stats().total() > 0);

        drop(f);
        drop(nas);
        assert!(
            std::fs::read_dir(&mnt).expect("readdir").next().is_none(),
            "mount point is empty again after drop"
        );
    }

    #[test]
    fn concurrent_operations_overlap_like_nfs_rpcs() {
        if !can_mount() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, mnt) = (dir.path().join("src"), dir.path().join("mnt"));
        std::fs::create_dir_all(&src).expect("mkdir");
        std::fs::create_dir_all(&mnt).expect("mkdir");
        for i in 0..64 {
            std::fs::write(src.join(format!("{i}.log")), "x\n").expect("write");
        }
        let opts = Options {
            latency: Duration::from_millis(20),
            threads: 64,
            entry_ttl: Duration::ZERO,
            ..Default::default()
        };
        let nas = SlowNas::mount(&src, &mnt, opts).expect("mount");
        let files: Vec<File> = (0..64)
            .map(|i| File::open(mnt.join(format!("{i}.log"))).expect("open"))
            .collect();
        // 64 stats from 64 threads: the stand-in serves them at once, as an NFS client keeps
        // many RPCs in flight.
        nas.stats().reset_peak();
        std::thread::scope(|s| {
            for f in &files {
                s.spawn(move || f.metadata().expect("fstat"));
            }
        });
        let peak = nas.stats().peak_in_flight();
        eprintln!("64 concurrent stats: {peak} in flight at once");
        assert!(peak >= 16, "64 concurrent stats: at most {peak} in flight");
        // 64 lookups of names in one directory (entry TTL 0: each a lookup) overlap too: the
        // kernel serializes them unless the filesystem asks for parallel directory operations.
        nas.stats().reset_peak();
        let lookups = nas.stats().lookup.load(Ordering::SeqCst);
        std::thread::scope(|s| {
            for i in 0..64 {
                let p = mnt.join(format!("{i}.log"));
                s.spawn(move || std::fs::symlink_metadata(p).expect("lstat"));
            }
        });
        let peak = nas.stats().peak_in_flight();
        let lookups = nas.stats().lookup.load(Ordering::SeqCst) - lookups;
        eprintln!(
            "64 concurrent lookups in one directory: {lookups} lookups, {peak} in flight at once"
        );
        assert!(lookups >= 64, "{lookups} lookups: names were cached");
        assert!(
            peak >= 16,
            "lookups in one directory: at most {peak} in flight"
        );
        drop(files);
        drop(nas);
    }

    #[test]
    fn rounds_cover_every_file_once() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        // An unfinished round cut by a sleep, then two rounds over files 1-3 with sleeps.
        let touches = vec![
            (ms(0), 2),
            (ms(5), 3),
            (ms(500), 1),
            (ms(501), 3),
            (ms(503), 2),
            (ms(1000), 3),
            (ms(1010), 2),
            (ms(1030), 1),
        ];
        let gap = Duration::from_millis(100);
        assert_eq!(
            rounds(&touches, 3, gap),
            [Duration::from_millis(3), Duration::from_millis(30)]
        );
        // Back to back: each round ends when every file was touched.
        let touches: Vec<_> = (0..9).map(|i| (ms(i * 10), i % 3)).collect();
        assert_eq!(rounds(&touches, 3, gap), [Duration::from_millis(20); 3]);
    }
}
