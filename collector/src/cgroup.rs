//! cgroup v2 ids to cgroup paths, for the probe's writer tags.
//!
//! The probe reports each writer's cgroup v2 id, which is the inode number of the cgroup's
//! directory on the cgroup2 filesystem. [`CgroupPaths`] finds the cgroup2 mount (from
//! `/proc/self/mountinfo`: `/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a
//! hybrid one), walks it once to map every directory's inode number to its path, and walks again
//! only when asked for an id it does not know (a cgroup created since), at most once per
//! [`REWALK_AFTER`]. Cgroup ids are never reused, so a cached path stays right; a re-walk drops
//! the cgroups that are gone.
//!
//! It sees the cgroups this process's cgroup namespace and mount show: a collector in a
//! container needs the host's cgroup2 filesystem mounted (or the host cgroup namespace) to
//! resolve other pods' cgroups. An id it cannot resolve gives no tag.
//!
//! What it does not do: read `/proc/<pid>/cgroup` (the writer may be gone by then, and a pid
//! lookup per event costs more than a cache hit), or decide what the tags are (`tags`).

use std::collections::HashMap;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::tags::Writer;

/// Shortest time between two walks of the cgroup tree, so events from writers whose cgroup is
/// outside the mount (or gone) do not walk it on every drain.
pub const REWALK_AFTER: Duration = Duration::from_secs(1);
/// Directories mapped at most, a bound on memory and on one walk's time.
const MAX_CGROUPS: usize = 200_000;

/// Resolves cgroup ids to [`Writer`]s (path + container id), cached.
#[derive(Debug)]
pub struct CgroupPaths {
    /// The cgroup2 mount, when there is one.
    root: Option<PathBuf>,
    by_id: HashMap<u64, Arc<Writer>>,
    walked_at: Option<Instant>,
}

impl CgroupPaths {
    /// A resolver over this process's cgroup2 mount; resolves nothing when there is none.
    pub fn new() -> CgroupPaths {
        let root = std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|m| cgroup2_mount(&m));
        if root.is_none() {
            tracing::warn!("no cgroup2 filesystem mounted: writer tags stay empty");
        }
        CgroupPaths::with_root(root)
    }

    /// A resolver over the cgroup2 tree at `root`.
    pub fn with_root(root: Option<PathBuf>) -> CgroupPaths {
        CgroupPaths {
            root,
            by_id: HashMap::new(),
            walked_at: None,
        }
    }

    /// The cgroup2 mount this resolves against.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The writer in cgroup `id`, or `None` when no cgroup under the mount has that id (or it
    /// was created within [`REWALK_AFTER`] of the last walk: a later event resolves it).
    pub fn resolve(&mut self, id: u64) -> Option<Arc<Writer>> {
        if let Some(w) = self.by_id.get(&id) {
            return Some(Arc::clone(w));
        }
        let root = self.root.as_deref()?;
        if self.walked_at.is_some_and(|t| t.elapsed() < REWALK_AFTER) {
            return None;
        }
        self.walked_at = Some(Instant::now());
        let old = std::mem::take(&mut self.by_id);
        for (ino, path) in walk(root) {
            // Keep the Arcs of known cgroups, so the tailer sees the same writer as unchanged.
            let w = match old.get(&ino) {
                Some(w) if w.cgroup == path => Arc::clone(w),
                _ => Arc::new(Writer::new(path)),
            };
            self.by_id.insert(ino, w);
        }
        tracing::debug!(cgroups = self.by_id.len(), "cgroup tree walked");
        self.by_id.get(&id).cloned()
    }
}

impl Default for CgroupPaths {
    fn default() -> Self {
        CgroupPaths::new()
    }
}

/// Every directory under `root` (itself included, as `/`): inode number -> path relative to
/// `root` with a leading `/`. Unreadable directories are skipped.
fn walk(root: &Path) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    if let Ok(m) = std::fs::metadata(root) {
        out.push((m.ino(), "/".to_string()));
    }
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if out.len() >= MAX_CGROUPS {
                tracing::warn!(
                    max = MAX_CGROUPS,
                    "too many cgroups, the rest are not mapped"
                );
                return out;
            }
            let name = entry.file_name();
            let path = format!("{rel}/{}", name.to_string_lossy());
            // kernfs reports the cgroup id as the directory entry's inode number (no stat).
            out.push((entry.ino(), path.clone()));
            stack.push((entry.path(), path));
        }
    }
    out
}

/// The mount point of the first cgroup2 filesystem in a `/proc/self/mountinfo` text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // `<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <type> ...`
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mount = left.split(' ').nth(4)?;
        Some(PathBuf::from(unescape_octal(mount)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_on_unified_and_hybrid_hosts() {
        let unified = "25 1 0:22 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let hybrid = "\
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("40 1 0:5 / /my\\040cg rw - cgroup2 none rw\n"),
            Some(PathBuf::from("/my cg"))
        );
        assert_eq!(
            cgroup2_mount("32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw\n"),
            None
        );
    }

    #[test]
    fn ids_are_the_directories_inode_numbers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let leaf = dir.path().join("kubepods.slice/cri-containerd-abc.scope");
        std::fs::create_dir_all(&leaf).expect("mkdir");
        let ino = std::fs::metadata(&leaf).expect("stat").ino();
        let mut paths = CgroupPaths::with_root(Some(dir.path().to_path_buf()));
        let w = paths.resolve(ino).expect("found by walking");
        assert_eq!(w.cgroup, "/kubepods.slice/cri-containerd-abc.scope");
        let root = std::fs::metadata(dir.path()).expect("stat").ino();
        assert_eq!(paths.resolve(root).expect("root").cgroup, "/");
        assert!(Arc::ptr_eq(&w, &paths.resolve(ino).expect("cached")));

        // A cgroup made after the walk is found by the next walk, not before REWALK_AFTER.
        let late = dir.path().join("late");
        std::fs::create_dir(&late).expect("mkdir");
        let late_ino = std::fs::metadata(&late).expect("stat").ino();
        assert_eq!(paths.resolve(late_ino), None);
        paths.walked_at = Some(Instant::now() - REWALK_AFTER);
        assert_eq!(paths.resolve(late_ino).expect("re-walked").cgroup, "/late");
        assert!(Arc::ptr_eq(&w, &paths.resolve(ino).expect("kept")));
        assert_eq!(CgroupPaths::with_root(None).resolve(ino), None);
    }
}
