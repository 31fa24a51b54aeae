//! Faults the slow-NAS stand-in injects while mounted: errors on chosen operations of chosen
//! paths (EIO, ESTALE, any errno) and directories that vanish from their parent and come back.
//!
//! [`Faults`] is a shared, mutable set of [`Fault`]s; the filesystem consults it on every
//! request, so a test adds and lifts faults while a collector reads the mount
//! ([`Faults::add`] returns a [`FaultId`] for [`Faults::lift`]). From a shell, `cargo xtask
//! slownas --faults FILE` watches a control file of [`Fault::parse`] lines instead, replacing
//! the whole set whenever the file changes.
//!
//! A path is named relative to the mount root and covers everything beneath it. A hidden
//! directory is gone by name (lookup says ENOENT, its parent does not list it), while
//! descriptors already open beneath it keep working, as for a directory moved away on the
//! server. This module only decides; `slownas` applies the decisions.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

/// An operation a fault can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Name lookup (`stat`/`open` of a path not in the kernel's dentry cache).
    Lookup,
    /// Attributes (`stat`, `fstat`, `statx`).
    Getattr,
    /// Opening a file.
    Open,
    /// Reading file data.
    Read,
    /// Listing a directory (opendir).
    Readdir,
}

impl Op {
    /// Every operation.
    pub const ALL: [Op; 5] = [Op::Lookup, Op::Getattr, Op::Open, Op::Read, Op::Readdir];

    fn parse(s: &str) -> Result<Op> {
        Ok(match s {
            "lookup" => Op::Lookup,
            "getattr" | "stat" => Op::Getattr,
            "open" => Op::Open,
            "read" => Op::Read,
            "readdir" => Op::Readdir,
            _ => bail!("unknown operation {s:?} (lookup, getattr, open, read, readdir, all)"),
        })
    }
}

/// One injected fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `ops` on `under` (and everything beneath it) fail with `errno`.
    Fail {
        /// The operations that fail.
        ops: Vec<Op>,
        /// Relative to the mount root; empty: the whole mount.
        under: PathBuf,
        /// The error returned (`libc::EIO`, `libc::ESTALE`, ...).
        errno: i32,
    },
    /// The directory `dir` is gone from its parent by name.
    Hide {
        /// Relative to the mount root.
        dir: PathBuf,
    },
}

impl Fault {
    /// `ops` on `under` fail with `errno`.
    pub fn fail(ops: &[Op], under: impl AsRef<Path>, errno: i32) -> Fault {
        Fault::Fail {
            ops: ops.to_vec(),
            under: relative(under.as_ref()),
            errno,
        }
    }

    /// `dir` vanishes from its parent.
    pub fn hide(dir: impl AsRef<Path>) -> Fault {
        Fault::Hide {
            dir: relative(dir.as_ref()),
        }
    }

    /// Parses one control-file line: `fail OPS ERRNO PATH` (OPS comma-separated or `all`,
    /// ERRNO a name such as `EIO`, `ESTALE`, `ENOENT`, `EACCES` or a number) or `hide DIR`.
    /// Blank lines and `#` comments give `None`.
    pub fn parse(line: &str) -> Result<Option<Fault>> {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            return Ok(None);
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["fail", ops, errno, path] => {
                let ops = if *ops == "all" {
                    Op::ALL.to_vec()
                } else {
                    ops.split(',').map(Op::parse).collect::<Result<_>>()?
                };
                Ok(Some(Fault::fail(&ops, path, parse_errno(errno)?)))
            }
            ["hide", dir] => Ok(Some(Fault::hide(dir))),
            _ => bail!("expected `fail OPS ERRNO PATH` or `hide DIR`, got {line:?}"),
        }
    }
}

fn parse_errno(s: &str) -> Result<i32> {
    Ok(match s {
        "EIO" => libc::EIO,
        "ESTALE" => libc::ESTALE,
        "ENOENT" => libc::ENOENT,
        "EACCES" => libc::EACCES,
        "EAGAIN" => libc::EAGAIN,
        "ETIMEDOUT" => libc::ETIMEDOUT,
        "ENOTCONN" => libc::ENOTCONN,
        n => n
            .parse()
            .with_context(|| format!("unknown errno {n:?} (a name or a number)"))?,
    })
}

/// `p` without a leading `/` or `./`, as the filesystem compares it.
fn relative(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

/// Identifies a fault added with [`Faults::add`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FaultId(u64);

/// The faults in force; shared between the filesystem and whoever drives it.
#[derive(Debug, Default)]
pub struct Faults {
    active: Mutex<Vec<(FaultId, Fault)>>,
    next: AtomicU64,
    injected: AtomicU64,
}

impl Faults {
    /// Puts `f` in force from the next request on.
    pub fn add(&self, f: Fault) -> FaultId {
        let id = FaultId(self.next.fetch_add(1, Ordering::Relaxed));
        self.active.lock().expect("faults lock").push((id, f));
        id
    }

    /// Lifts one fault.
    pub fn lift(&self, id: FaultId) {
        self.active
            .lock()
            .expect("faults lock")
            .retain(|(i, _)| *i != id);
    }

    /// Replaces every fault with `faults` (the control file changed).
    pub fn replace(&self, faults: Vec<Fault>) {
        let ids: Vec<_> = faults
            .into_iter()
            .map(|f| (FaultId(self.next.fetch_add(1, Ordering::Relaxed)), f))
            .collect();
        *self.active.lock().expect("faults lock") = ids;
    }

    /// Lifts every fault.
    pub fn clear(&self) {
        self.active.lock().expect("faults lock").clear();
    }

    /// How many requests failed or missed a hidden name because of a fault, so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// The error for `op` on `rel` (relative to the mount root), if a fault says so.
    pub(super) fn error(&self, op: Op, rel: &Path) -> Option<i32> {
        let active = self.active.lock().expect("faults lock");
        let hit = active.iter().find_map(|(_, f)| match f {
            Fault::Fail { ops, under, errno } if ops.contains(&op) && rel.starts_with(under) => {
                Some(*errno)
            }
            // Names beneath it too: the kernel may still hold the directory's own dentry.
            Fault::Hide { dir }
                if matches!(op, Op::Lookup | Op::Readdir) && rel.starts_with(dir) =>
            {
                Some(libc::ENOENT)
            }
            _ => None,
        });
        if hit.is_some() {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// Whether `rel` is a hidden directory (left out of its parent's listing).
    pub(super) fn hidden(&self, rel: &Path) -> bool {
        let active = self.active.lock().expect("faults lock");
        let hit = active
            .iter()
            .any(|(_, f)| matches!(f, Fault::Hide { dir } if rel == dir));
        if hit {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// Reads `control` and puts its faults in force (an unreadable or missing file: none).
    pub fn load(&self, control: &Path) -> Result<usize> {
        let text = match std::fs::read_to_string(control) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("read {}", control.display())),
        };
        let mut faults = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let f =
                Fault::parse(line).with_context(|| format!("{}:{}", control.display(), i + 1))?;
            faults.extend(f);
        }
        let n = faults.len();
        self.replace(faults);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_lines_parse_and_match_beneath_their_path() {
        let f = Fault::parse("fail read,getattr ESTALE /nginx/pod-1 # flaky").expect("parse");
        assert_eq!(
            f,
            Some(Fault::fail(
                &[Op::Read, Op::Getattr],
                "nginx/pod-1",
                libc::ESTALE
            ))
        );
        assert_eq!(Fault::parse("  # nothing").expect("parse"), None);
        assert_eq!(
            Fault::parse("hide nginx/pod-2").expect("parse"),
            Some(Fault::hide("nginx/pod-2"))
        );
        assert!(Fault::parse("fail sometimes EIO x").is_err());
        assert!(Fault::parse("fail read EWHAT x").is_err());
        assert_eq!(
            Fault::parse("fail all 5 x").expect("parse"),
            Some(Fault::fail(&Op::ALL, "x", 5))
        );

        let faults = Faults::default();
        let id = faults.add(Fault::fail(&[Op::Read], "nginx/pod-1", libc::EIO));
        faults.add(Fault::hide("nginx/pod-2"));
        let p = Path::new("nginx/pod-1/access.log");
        assert_eq!(faults.error(Op::Read, p), Some(libc::EIO));
        assert_eq!(faults.error(Op::Getattr, p), None);
        assert_eq!(faults.error(Op::Read, Path::new("nginx/pod-10/a")), None);
        assert_eq!(
            faults.error(Op::Lookup, Path::new("nginx/pod-2")),
            Some(libc::ENOENT)
        );
        assert!(faults.hidden(Path::new("nginx/pod-2")));
        assert!(!faults.hidden(Path::new("nginx")));
        assert_eq!(faults.injected(), 3);
        faults.lift(id);
        assert_eq!(faults.error(Op::Read, p), None);
        faults.clear();
        assert!(!faults.hidden(Path::new("nginx/pod-2")));
    }
}
