//! Shard hand-over: when the number of sharded replicas changes, re-deal the acknowledged
//! offsets of every replica's checkpoint to the replicas that own the files under the new count.
//!
//! Each sharded replica keeps its own checkpoint in its own `data_dir`, all of them side by
//! side in one directory (`<root>/voltail-0`, `<root>/voltail-1`, ...). When the count changes,
//! a pod directory can move to another replica, which would read it from 0 (duplicates) or,
//! with `start_at = "end"`, skip what was not yet shipped (loss). [`reshard`] runs once, while
//! no replica runs: it takes every replica's lock (refusing if one is held: a replica still
//! runs), reads every checkpoint, keeps for each file the highest offset any of them
//! acknowledged, and rewrites the checkpoint of each replica of the new count with exactly the
//! files of its shard. Each replica keeps its own sink cursor. Reading everything before
//! writing anything is what makes it safe; a per-replica merge at each pod's start would race
//! with peers that already dropped what they no longer own.
//!
//! A checkpoint entry is matched to the file on disk when its path still names that inode: an
//! entry whose inode now holds another file (fingerprint differs) is stale and dropped; one
//! whose path is gone or renamed is kept as recorded, for the tailer to resolve at start-up.
//!
//! This module does not start or stop replicas; docs/operations.md ("Growing N") does.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use crate::checkpoint::{self, CheckpointError, Entry, State, Store};
use crate::config::Shard;
use crate::discovery::in_shard;
use crate::identity::{Match, FINGERPRINT_BYTES};
use crate::lock::{self, LockError};

/// Why a hand-over could not run.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// A replica's `data_dir` lock could not be taken.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A replica still runs: its lock is held.
    #[error("{path} is locked by a running replica ({holder}): stop every replica first")]
    Running {
        /// Its data_dir.
        path: PathBuf,
        /// Who holds the lock.
        holder: String,
    },
    /// The new count is zero.
    #[error("the replica count must be at least 1")]
    Count,
    /// The directory holds data dirs of differently named replicas.
    #[error("{path} holds data dirs of several StatefulSets ({names})")]
    Mixed {
        /// The directory.
        path: PathBuf,
        /// The names found.
        names: String,
    },
    /// A checkpoint could not be opened or written.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A directory could not be listed or created.
    #[error("{path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What [`reshard`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Data dirs whose checkpoint held entries.
    pub peers: Vec<PathBuf>,
    /// Data dirs whose checkpoint was unreadable (their files will be read again from 0).
    pub skipped: Vec<(PathBuf, String)>,
    /// Distinct files in all checkpoints after merging.
    pub files: usize,
    /// Files per replica data dir under the new count (0 for ordinals at or above it).
    pub per_replica: Vec<(PathBuf, usize)>,
    /// Entries dropped because their inode now holds another file.
    pub stale: usize,
}

/// How an entry relates to the file now at its path.
enum OnDisk {
    /// The path names the entry's file.
    Same,
    /// The path names another file in the entry's inode (inode reused): the entry is stale.
    Stale,
    /// Gone, renamed or unreadable: cannot tell; keep the entry as recorded.
    Unknown,
}

fn on_disk(e: &Entry) -> OnDisk {
    let Ok(f) = File::open(&e.path) else {
        return OnDisk::Unknown;
    };
    let Ok(md) = f.metadata() else {
        return OnDisk::Unknown;
    };
    if md.ino() != e.id.ino {
        return OnDisk::Unknown;
    }
    let mut prefix = vec![0u8; FINGERPRINT_BYTES];
    let mut n = 0;
    while n < prefix.len() {
        match f.read_at(&mut prefix[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return OnDisk::Unknown,
        }
    }
    match e.id.matches(md.dev(), md.ino(), &prefix[..n]) {
        Match::No => OnDisk::Stale,
        Match::Exact | Match::OtherDevice => OnDisk::Same,
    }
}

/// Merges the entries of every checkpoint: one per file, with the highest acknowledged offset
/// any of them recorded. Pure apart from looking at the files the entries name.
fn merge(all: Vec<Entry>, report: &mut Report) -> Vec<Entry> {
    // Same file = same inode and fingerprint (the device differs between nodes' mounts); an
    // entry verified against the file on disk also merges with one whose fingerprint covers
    // fewer bytes of the same file.
    #[derive(PartialEq, Eq, Hash)]
    enum Key {
        Verified(u64, String),
        Recorded(u64, u64, u32),
    }
    let mut best: HashMap<Key, Entry> = HashMap::new();
    for e in all {
        let key = match on_disk(&e) {
            OnDisk::Stale => {
                report.stale += 1;
                continue;
            }
            OnDisk::Same => Key::Verified(e.id.ino, e.path.clone()),
            OnDisk::Unknown => Key::Recorded(e.id.ino, e.id.fp, e.id.fp_len),
        };
        match best.get_mut(&key) {
            Some(cur) if cur.offset >= e.offset => {}
            Some(cur) => *cur = e,
            None => {
                best.insert(key, e);
            }
        }
    }
    let mut out: Vec<Entry> = best.into_values().collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// The replicas' data dirs in `root`: `(ordinal, path)` for every `<name>-<ordinal>`.
fn replica_dirs(root: &Path) -> Result<(String, Vec<(u32, PathBuf)>), HandoverError> {
    let err = |source| HandoverError::Dir {
        path: root.to_path_buf(),
        source,
    };
    let mut name = None;
    let mut dirs = Vec::new();
    for d in std::fs::read_dir(root).map_err(err)? {
        let p = d.map_err(err)?.path();
        let Some(file_name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some((prefix, ordinal)) = file_name.rsplit_once('-') else {
            continue;
        };
        let Ok(ordinal) = ordinal.parse::<u32>() else {
            continue;
        };
        if !p.is_dir() {
            continue;
        }
        match &name {
            None => name = Some(prefix.to_string()),
            Some(n) if n != prefix => {
                return Err(HandoverError::Mixed {
                    path: root.to_path_buf(),
                    names: format!("{n}-*, {prefix}-*"),
                })
            }
            Some(_) => {}
        }
        dirs.push((ordinal, p));
    }
    dirs.sort();
    Ok((name.unwrap_or_else(|| "voltail".into()), dirs))
}

/// Takes `dir`'s lock without waiting; a held lock means a replica still runs there.
fn lock_now(dir: &Path) -> Result<lock::DataDirLock, HandoverError> {
    std::fs::create_dir_all(dir).map_err(|source| HandoverError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let stop = AtomicBool::new(true);
    let mut holder = String::new();
    lock::acquire(dir, &stop, |who| holder = who.to_string())?.ok_or_else(|| {
        HandoverError::Running {
            path: dir.to_path_buf(),
            holder,
        }
    })
}

/// Re-deals the checkpoints of the replicas in `root` (one `data_dir` per replica, named
/// `<statefulset>-<ordinal>`) for `count` replicas. Every replica must be stopped.
pub fn reshard(root: &Path, count: u32) -> Result<Report, HandoverError> {
    if count == 0 {
        return Err(HandoverError::Count);
    }
    let (name, old) = replica_dirs(root)?;
    let mut dirs: Vec<(u32, PathBuf)> = old.clone();
    for o in 0..count {
        if !dirs.iter().any(|(x, _)| *x == o) {
            dirs.push((o, root.join(format!("{name}-{o}"))));
        }
    }
    dirs.sort();
    // Lock everything first: nothing is read or written while a replica might run.
    let mut locks = Vec::new();
    for (_, d) in &dirs {
        locks.push(lock_now(d)?);
    }
    let mut report = Report::default();
    let mut all = Vec::new();
    let mut stores = Vec::new();
    for (o, d) in &dirs {
        let (store, loaded) = Store::open(d)?;
        if let checkpoint::LoadOutcome::Lost { problem } = &loaded.outcome {
            report.skipped.push((d.clone(), problem.clone()));
        } else if !loaded.entries.is_empty() {
            report.peers.push(d.clone());
        }
        all.extend(loaded.entries);
        stores.push((*o, store, loaded.cursor.unwrap_or_default()));
    }
    let merged = merge(all, &mut report);
    for (o, store, cursor) in &mut stores {
        let shard = Shard { ordinal: *o, count };
        let mut state = State::default();
        if *o < count {
            for e in merged
                .iter()
                .filter(|e| in_shard(shard, Path::new(&e.path)))
            {
                state.entries.insert(state.entries.len() as u64, e.clone());
            }
        }
        report
            .per_replica
            .push((root.join(format!("{name}-{o}")), state.entries.len()));
        state.cursor = std::mem::take(cursor);
        store.write(&state)?;
    }
    report.files = merged.len();
    drop(locks);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::FileId;
    use std::io::Write;

    fn entry(path: &Path, offset: u64) -> Entry {
        let md = std::fs::metadata(path).expect("file exists");
        let bytes = std::fs::read(path).expect("readable");
        Entry {
            id: FileId::new(
                md.dev(),
                md.ino(),
                &bytes[..bytes.len().min(FINGERPRINT_BYTES)],
            ),
            path: path.to_string_lossy().into_owned(),
            source: "nginx".into(),
            offset,
        }
    }

    fn write_checkpoint(dir: &Path, entries: Vec<Entry>) {
        std::fs::create_dir_all(dir).expect("mkdir");
        let (mut store, _) = Store::open(dir).expect("open");
        let mut st = State::default();
        for (i, e) in entries.into_iter().enumerate() {
            st.entries.insert(i as u64, e);
        }
        store.write(&st).expect("write");
    }

    #[test]
    fn growing_two_to_three_gives_every_file_to_one_replica_at_its_offset() {
        let t = tempfile::tempdir().expect("tempdir");
        let logs = t.path().join("logs");
        let mut files = Vec::new();
        for i in 0..8 {
            let d = logs.join(format!("ns_pod{i}_ip_ip_node"));
            std::fs::create_dir_all(&d).expect("mkdir");
            let p = d.join("access.log");
            let mut f = File::create(&p).expect("create");
            writeln!(f, "line one of pod {i}\nline two").expect("write");
            files.push(p);
        }
        let root = t.path().join("shards");
        for o in 0..2 {
            let old = Shard {
                ordinal: o,
                count: 2,
            };
            let mine: Vec<Entry> = files
                .iter()
                .filter(|p| in_shard(old, p))
                .map(|p| entry(p, 10 + u64::from(o)))
                .collect();
            write_checkpoint(&root.join(format!("voltail-{o}")), mine);
        }
        let r = reshard(&root, 3).expect("reshard");
        assert_eq!(r.files, files.len(), "{r:?}");
        let mut total = 0;
        for o in 0..3 {
            let new = Shard {
                ordinal: o,
                count: 3,
            };
            let l = checkpoint::read_only(&root.join(format!("voltail-{o}"))).expect("read");
            assert!(
                l.entries.iter().all(|e| in_shard(new, Path::new(&e.path))),
                "{r:?}"
            );
            assert!(l.entries.iter().all(|e| e.offset >= 10), "{r:?}");
            total += l.entries.len();
        }
        assert_eq!(total, files.len(), "every file owned once");
    }

    #[test]
    fn a_running_replica_stops_the_reshard() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = t.path().join("voltail-0");
        std::fs::create_dir_all(&d).expect("mkdir");
        let stop = AtomicBool::new(false);
        let _held = lock::acquire(&d, &stop, |_| {})
            .expect("lock")
            .expect("free");
        let e = reshard(t.path(), 2).expect_err("must refuse");
        assert!(matches!(e, HandoverError::Running { .. }), "{e}");
    }

    #[test]
    fn highest_offset_wins_and_stale_inodes_are_dropped() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("a.log");
        std::fs::write(&p, "0123456789\n").expect("write");
        let mut report = Report::default();
        let merged = merge(vec![entry(&p, 4), entry(&p, 11)], &mut report);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].offset, 11);
        let mut stale = entry(&p, 3);
        stale.id.fp ^= 1;
        let mut report = Report::default();
        assert!(merge(vec![stale], &mut report).is_empty());
        assert_eq!(report.stale, 1);
    }
}
