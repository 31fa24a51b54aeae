//! Workload trees: pod-style directories of nginx access logs, and the writers that grow them.
//!
//! [`Tree::create`] lays out `<root>/<app>/<namespace>_<pod>_<podIP>_<nodeIP>_<node>/<name>.log`
//! the way the kubelet-side sidecars of our users do, and fills each file with [`LineGen`]
//! lines (in parallel: W1 writes a GiB). [`Tree::append`] runs the W3 writer pool: each file
//! grows by `rate` lines per second, every line one `write(2)` stamped with its write time.
//! The tree remembers how many lines each file holds: that is what the verifier checks against.
//!
//! It does not run collectors or read their output.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::nginx::{LineGen, LineId};

/// File names inside one pod directory (W2 puts five files in each).
const NAMES: [&str; 5] = [
    "access.log",
    "api.log",
    "static.log",
    "admin.log",
    "upstream.log",
];
const APPS: [&str; 8] = [
    "web", "api", "checkout", "search", "cart", "auth", "media", "gateway",
];
const NAMESPACES: [&str; 4] = ["shop", "payments", "platform", "edge"];

/// The include glob and path-tag regex that match a tree rooted at `root`.
pub fn source_patterns(root: &Path) -> (String, String) {
    let r = root.display().to_string();
    (
        format!("{r}/*/*/*.log"),
        format!(
            "^{}/(?P<app>[^/]+)/(?P<namespace>[^_]+)_(?P<pod>[^_]+)_(?P<pod_ip>[^_]+)_(?P<node_ip>[^_]+)_(?P<node>[^/]+)/",
            regex_escape(&r)
        ),
    )
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Now, unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A generated tree of log files.
#[derive(Debug)]
pub struct Tree {
    /// Where the pod directories are.
    pub root: PathBuf,
    /// Paths relative to `root`, indexed by the file number carried in each line.
    pub rel: Vec<String>,
    /// Lines each file holds now.
    pub lines: Vec<u64>,
    /// Bytes each file holds now.
    pub bytes: Vec<u64>,
    seed: u64,
}

impl Tree {
    /// Creates `dirs` pod directories with `per_dir` files each, every file holding about
    /// `bytes_per_file` bytes of whole lines (0: empty files).
    pub fn create(
        root: &Path,
        dirs: usize,
        per_dir: usize,
        bytes_per_file: u64,
        seed: u64,
    ) -> Result<Tree> {
        assert!(
            per_dir <= NAMES.len(),
            "at most {} files per dir",
            NAMES.len()
        );
        let mut rel = Vec::with_capacity(dirs * per_dir);
        for d in 0..dirs {
            let app = APPS[d % APPS.len()];
            let ns = NAMESPACES[d / APPS.len() % NAMESPACES.len()];
            let pod = format!(
                "{app}-{:08x}-{:05}",
                d.wrapping_mul(2_654_435_761) as u32,
                d
            );
            let pod_ip = format!("10.244.{}.{}", d / 250 % 256, d % 250 + 2);
            let node = d % 16;
            let dir = format!("{app}/{ns}_{pod}_{pod_ip}_10.0.0.{}_node-{node}", node + 10);
            std::fs::create_dir_all(root.join(&dir))
                .with_context(|| format!("create {}", root.join(&dir).display()))?;
            for name in &NAMES[..per_dir] {
                rel.push(format!("{dir}/{name}"));
            }
        }
        let n = rel.len();
        let mut tree = Tree {
            root: root.to_path_buf(),
            rel,
            lines: vec![0; n],
            bytes: vec![0; n],
            seed,
        };
        tree.fill(bytes_per_file)?;
        Ok(tree)
    }

    /// Absolute path of file `i`.
    pub fn path(&self, i: usize) -> PathBuf {
        self.root.join(&self.rel[i])
    }

    /// Total lines in the tree.
    pub fn total_lines(&self) -> u64 {
        self.lines.iter().sum()
    }

    /// Total bytes in the tree.
    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }

    /// The pod name encoded in file `i`'s directory (what the `pod` tag must say).
    pub fn pod_of(&self, i: usize) -> &str {
        self.rel[i]
            .split('/')
            .nth(1)
            .and_then(|d| d.split('_').nth(1))
            .unwrap_or("")
    }

    fn fill(&mut self, bytes_per_file: u64) -> Result<()> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let n = self.rel.len();
        let base_ms = now_ms() - 3_600_000;
        let results: Vec<Result<Vec<(usize, u64, u64)>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let this = &*self;
                    s.spawn(move || -> Result<Vec<(usize, u64, u64)>> {
                        let mut out = Vec::new();
                        let mut buf = Vec::with_capacity(512);
                        for i in (t..n).step_by(threads) {
                            let path = this.path(i);
                            let f = File::create(&path)
                                .with_context(|| format!("create {}", path.display()))?;
                            let mut w = BufWriter::with_capacity(1 << 20, f);
                            let mut g = LineGen::new(this.seed ^ (i as u64).wrapping_mul(31));
                            let (mut lines, mut bytes) = (0u64, 0u64);
                            while bytes < bytes_per_file {
                                buf.clear();
                                let id = LineId {
                                    file: i as u32,
                                    seq: lines,
                                };
                                g.line(id, base_ms + lines * 7, &mut buf);
                                w.write_all(&buf)?;
                                lines += 1;
                                bytes += buf.len() as u64;
                            }
                            w.flush()
                                .with_context(|| format!("write {}", path.display()))?;
                            out.push((i, lines, bytes));
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("generator thread does not panic"))
                .collect()
        });
        for r in results {
            for (i, lines, bytes) in r? {
                self.lines[i] = lines;
                self.bytes[i] = bytes;
            }
        }
        Ok(())
    }

    /// Appends `rate` lines per second to every file for `duration`, from `threads` writer
    /// threads, each line one `write(2)` carrying its write time. Stops early when `stop` is
    /// set. Updates the line counts.
    pub fn append(
        &mut self,
        rate: f64,
        duration: Duration,
        threads: usize,
        stop: &AtomicBool,
    ) -> Result<()> {
        let n = self.rel.len();
        let start = Instant::now();
        let results: Vec<Result<Vec<(usize, u64, u64)>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let this = &*self;
                    s.spawn(move || -> Result<Vec<(usize, u64, u64)>> {
                        let mut files = Vec::new();
                        for i in (t..n).step_by(threads) {
                            let path = this.path(i);
                            let f = OpenOptions::new()
                                .append(true)
                                .open(&path)
                                .with_context(|| format!("open {}", path.display()))?;
                            // Spread the files' phases so writes do not come in bursts.
                            let phase = i as f64 / n as f64;
                            files.push((i, f, this.lines[i], 0u64, 0u64, phase));
                        }
                        let mut g = LineGen::new(this.seed ^ 0xa11e ^ t as u64);
                        let mut buf = Vec::with_capacity(512);
                        loop {
                            let elapsed = start.elapsed();
                            let done = elapsed >= duration || stop.load(Ordering::Relaxed);
                            let el = elapsed.min(duration).as_secs_f64();
                            for (i, f, seq0, written, bytes, phase) in files.iter_mut() {
                                let due = (el * rate + *phase).floor() as u64;
                                while *written < due {
                                    buf.clear();
                                    let id = LineId {
                                        file: *i as u32,
                                        seq: *seq0 + *written,
                                    };
                                    g.line(id, now_ms(), &mut buf);
                                    f.write_all(&buf).with_context(|| {
                                        format!("append {}", this.path(*i).display())
                                    })?;
                                    *written += 1;
                                    *bytes += buf.len() as u64;
                                }
                            }
                            if done {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Ok(files
                            .into_iter()
                            .map(|(i, _, _, w, b, _)| (i, w, b))
                            .collect())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("writer thread does not panic"))
                .collect()
        });
        for r in results {
            for (i, lines, bytes) in r? {
                self.lines[i] += lines;
                self.bytes[i] += bytes;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nginx::parse_line;

    #[test]
    fn tree_has_pod_dirs_and_counted_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = Tree::create(dir.path(), 3, 2, 10_000, 1).expect("create");
        assert_eq!(tree.rel.len(), 6);
        for i in 0..tree.rel.len() {
            let text = std::fs::read(tree.path(i)).expect("read");
            assert_eq!(text.len() as u64, tree.bytes[i]);
            let lines: Vec<_> = text
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .collect();
            assert_eq!(lines.len() as u64, tree.lines[i]);
            for (seq, l) in lines.iter().enumerate() {
                let p = parse_line(l).expect("parses");
                assert_eq!(
                    p.id,
                    LineId {
                        file: i as u32,
                        seq: seq as u64
                    }
                );
            }
            assert!(!tree.pod_of(i).is_empty());
        }
        let (glob, tags) = source_patterns(dir.path());
        assert!(glob.ends_with("/*/*/*.log"));
        assert!(tags.contains("(?P<pod>"));
    }

    #[test]
    fn append_adds_rate_times_duration_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut tree = Tree::create(dir.path(), 4, 1, 0, 1).expect("create");
        let stop = AtomicBool::new(false);
        tree.append(20.0, Duration::from_millis(500), 2, &stop)
            .expect("append");
        for i in 0..4 {
            // 20 lines/s for 0.5 s, plus at most one for the phase.
            assert!((10..=11).contains(&tree.lines[i]), "{}", tree.lines[i]);
            let text = std::fs::read(tree.path(i)).expect("read");
            assert_eq!(
                text.iter().filter(|b| **b == b'\n').count() as u64,
                tree.lines[i]
            );
        }
    }
}
