//! Choosing the read backend: `reader = "auto" | "io_uring" | "pread"` and the filesystems of the
//! roots.
//!
//! [`select`] looks at each root's filesystem (`statfs` magic, [`fs_kind`]): on network and FUSE
//! filesystems every call is a round trip, so `auto` takes io_uring there (one round trip per
//! round) and plain sequential syscalls on local disks (measured faster there). Where the kernel
//! refuses io_uring it falls back to `pread` (a thread pool on network filesystems) and says so in
//! one `warn` line. The [`Selected::reason`] explains the choice for logs and `--check` output.
//!
//! This module only chooses; it never retries later, and it does not export the metric (the
//! daemon labels `voltail_reader_backend` with [`Selected::name`]).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::backend::ReadBackend;
use super::pread::{PreadBackend, PreadPool};
use super::uring::{UringBackend, UringOptions};
use crate::config::ReaderKind;

/// The chosen backend and why.
pub struct Selected {
    /// The backend, ready to use.
    pub backend: Box<dyn ReadBackend>,
    /// Its name (`io_uring`, `pread`, `pread_pool`), the same as `backend.name()`.
    pub name: &'static str,
    /// Why it was chosen, for the startup log line.
    pub reason: String,
    /// Whether a root is on a network or FUSE filesystem (every call a round trip).
    pub network: bool,
}

impl std::fmt::Debug for Selected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selected")
            .field("name", &self.name)
            .field("reason", &self.reason)
            .finish()
    }
}

/// What a filesystem is, as far as the cost of a call goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// Every call may be a network round trip (NFS, SMB, Ceph, FUSE, ...); the name says which.
    Network(&'static str),
    /// A local filesystem (or one we don't know, treated as local); the name when known.
    Local(&'static str),
}

impl FsKind {
    /// Whether calls on it are round trips.
    pub fn is_network(self) -> bool {
        matches!(self, FsKind::Network(_))
    }

    /// Its short name (`nfs`, `fuse`, `ext4`, `unknown`).
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Network(n) | FsKind::Local(n) => n,
        }
    }
}

/// `statfs` magics of network, cluster and FUSE filesystems (`linux/magic.h` and the projects'
/// own headers). GlusterFS, s3fs, sshfs and most other userspace ones report FUSE.
const NETWORK_MAGICS: &[(i64, &str)] = &[
    (0x6969, "nfs"),
    (0x6573_5546, "fuse"),
    (0x517b, "smb"),
    (0xff53_4d42, "cifs"),
    (0xfe53_4d42, "smb2"),
    (0x00c3_6400, "ceph"),
    (0x0102_1997, "9p"),
    (0x6b41_4653, "afs"),
    (0x5346_414f, "afs"),
    (0x0bd0_0bd0, "lustre"),
    (0x4750_4653, "gpfs"),
    (0x1983_0326, "beegfs"),
    (0x2003_0528, "orangefs"),
    (0x564c, "ncp"),
    (0x7375_7245, "coda"),
    (0x0116_1970, "gfs2"),
    (0x7461_636f, "ocfs2"),
];

/// `statfs` magics of common local filesystems, for the reason string only.
const LOCAL_MAGICS: &[(i64, &str)] = &[
    (0xef53, "ext4"),
    (0x5846_5342, "xfs"),
    (0x9123_683e, "btrfs"),
    (0x0102_1994, "tmpfs"),
    (0x794c_7630, "overlayfs"),
    (0x2fc1_2fc1, "zfs"),
    (0xf2f5_2010, "f2fs"),
    (0x9fa0, "proc"),
    (0x6265_6572, "sysfs"),
];

/// The kind of filesystem with `statfs` magic `magic`.
pub fn kind_of_magic(magic: i64) -> FsKind {
    // f_type is a signed word on some architectures: compare the low 32 bits.
    let m = magic & 0xffff_ffff;
    if let Some((_, n)) = NETWORK_MAGICS.iter().find(|(k, _)| *k == m) {
        return FsKind::Network(n);
    }
    match LOCAL_MAGICS.iter().find(|(k, _)| *k == m) {
        Some((_, n)) => FsKind::Local(n),
        None => FsKind::Local("unknown"),
    }
}

/// The filesystem holding `path`, or holding its nearest existing ancestor (a root may not
/// exist yet); `None` when nothing along the way can be examined.
pub fn fs_kind(path: &Path) -> Option<FsKind> {
    path.ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .find_map(statfs_magic)
        .map(kind_of_magic)
}

fn statfs_magic(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and outlives the call; `st` is a valid out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type is i64 or u32 by architecture"
    )]
    (rc == 0).then_some(st.f_type as i64)
}

/// Chooses the backend for `kind` given the roots the sources watch.
pub fn select(kind: ReaderKind, roots: &[PathBuf]) -> Selected {
    let network = roots
        .iter()
        .find_map(|r| fs_kind(r).filter(|k| k.is_network()).map(|k| (r, k)));
    let where_ = match network {
        Some((root, k)) => format!("{} is {}", root.display(), k.name()),
        None => {
            let kinds: Vec<String> = roots
                .iter()
                .map(|r| {
                    let k = fs_kind(r).map_or("unknown", FsKind::name);
                    format!("{} is {k}", r.display())
                })
                .collect();
            if kinds.is_empty() {
                "no roots".to_string()
            } else {
                kinds.join(", ")
            }
        }
    };
    let is_network = network.is_some();

    match kind {
        ReaderKind::Pread => plain(format!("pread: configured; {where_}"), is_network),
        ReaderKind::Auto if !is_network => Selected {
            backend: Box::new(PreadBackend),
            name: "pread",
            reason: format!("auto: {where_}; local filesystems are fastest with plain syscalls"),
            network: false,
        },
        ReaderKind::Auto | ReaderKind::IoUring => {
            let mode = if kind == ReaderKind::Auto {
                "auto"
            } else {
                "io_uring"
            };
            // Network filesystems block inline reads for a round trip: send them to the workers.
            let opts = UringOptions {
                async_reads: is_network,
                ..UringOptions::default()
            };
            match UringBackend::with_options(opts) {
                Ok(b) => Selected {
                    backend: Box::new(b),
                    name: "io_uring",
                    reason: format!("{mode}: {where_}; io_uring available"),
                    network: is_network,
                },
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring refused; falling back to pread");
                    plain(
                        format!("{mode}: {where_}; io_uring refused: {e}"),
                        is_network,
                    )
                }
            }
        }
    }
}

/// Sequential `pread` on local filesystems, the pool on network ones.
fn plain(reason: String, network: bool) -> Selected {
    if network {
        let pool = PreadPool::default();
        Selected {
            reason: format!("{reason}; pread on {} threads", pool.threads()),
            name: "pread_pool",
            backend: Box::new(pool),
            network: true,
        }
    } else {
        Selected {
            backend: Box::new(PreadBackend),
            name: "pread",
            reason,
            network: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_name_network_filesystems() {
        assert_eq!(kind_of_magic(0x6969), FsKind::Network("nfs"));
        assert_eq!(kind_of_magic(0x6573_5546), FsKind::Network("fuse"));
        assert_eq!(kind_of_magic(0xff53_4d42), FsKind::Network("cifs"));
        // Sign-extended f_type, as a 32-bit word read into an i64 may come.
        assert_eq!(
            kind_of_magic(0xfe53_4d42_u32 as i32 as i64),
            FsKind::Network("smb2")
        );
        assert_eq!(kind_of_magic(0xef53), FsKind::Local("ext4"));
        assert_eq!(kind_of_magic(0x1234), FsKind::Local("unknown"));
    }

    /// On the local disk (or, with `TMPDIR` on a FUSE mount, on a network filesystem).
    #[test]
    fn auto_follows_the_filesystem_of_the_roots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kind = fs_kind(dir.path()).expect("a tempdir has a filesystem");
        let s = select(ReaderKind::Auto, &[dir.path().to_path_buf()]);
        assert_eq!(s.backend.name(), s.name);
        assert!(s.reason.starts_with("auto: "), "{}", s.reason);
        assert!(
            s.reason.contains(&dir.path().display().to_string()),
            "{}",
            s.reason
        );
        if kind.is_network() {
            let want = if UringBackend::new().is_ok() {
                "io_uring"
            } else {
                "pread_pool"
            };
            assert_eq!(s.name, want, "{}", s.reason);
        } else {
            assert_eq!(s.name, "pread", "{}", s.reason);
        }
    }

    #[test]
    fn auto_with_one_network_root_among_local_ones_names_it() {
        // /proc is local; a network root, when the test runs on one, decides.
        let dir = tempfile::tempdir().expect("tempdir");
        let roots = [PathBuf::from("/proc"), dir.path().to_path_buf()];
        let s = select(ReaderKind::Auto, &roots);
        if on_network(dir.path()) {
            assert!(s.name != "pread", "{}", s.reason);
        } else {
            assert_eq!(s.name, "pread");
            assert!(s.reason.contains("/proc is proc"), "{}", s.reason);
        }
    }

    fn on_network(p: &Path) -> bool {
        fs_kind(p).is_some_and(FsKind::is_network)
    }

    #[test]
    fn a_root_that_does_not_exist_yet_uses_its_ancestor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("not/yet/there");
        assert_eq!(fs_kind(&missing), fs_kind(dir.path()));
        assert!(fs_kind(&missing).is_some());
    }

    #[test]
    fn pread_is_sequential_on_a_local_disk_and_pooled_on_a_network_one() {
        let dir = std::env::temp_dir();
        let s = select(ReaderKind::Pread, std::slice::from_ref(&dir));
        let want = if on_network(&dir) {
            "pread_pool"
        } else {
            "pread"
        };
        assert_eq!(s.name, want, "{}", s.reason);
        assert_eq!(s.backend.name(), want);
    }

    #[test]
    fn io_uring_is_used_or_refused_with_a_reason() {
        let s = select(ReaderKind::IoUring, &[std::env::temp_dir()]);
        match UringBackend::new() {
            Ok(_) => assert_eq!(s.name, "io_uring"),
            Err(_) => {
                assert!(s.name.starts_with("pread"), "{}", s.name);
                assert!(s.reason.contains("refused"), "{}", s.reason);
            }
        }
        assert_eq!(s.backend.name(), s.name);
    }
}
