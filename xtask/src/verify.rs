//! Proving delivery: every line written arrives exactly once, and W3's arrival times.
//!
//! [`Checker`] holds, per file, a count for every line the workload wrote, and takes events
//! from any output: [`Checker::voltail_dir`] reads voltail's segment files (zstd frames or
//! plain NDJSON), parses every event as JSON and also checks its `file` and `pod` tag;
//! [`Checker::raw_line`] takes a peer's output line in whatever format it has (it only needs
//! to contain our line). [`Verdict`] then says what was lost, duplicated or unexpected.
//!
//! [`Follower`] tails plain-text output as it is written (voltail's `.ndjson` segments or a
//! peer's output file), which is how W3 measures end-to-end latency and how peers' progress is
//! seen.
//!
//! It does not run anything.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::nginx::parse_line;
use crate::workload::Tree;

/// One voltail event, as much of it as we check.
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    message: Cow<'a, str>,
    #[serde(borrow)]
    file: Cow<'a, str>,
    #[serde(default)]
    tags: HashMap<String, String>,
}

/// Counts every delivered line against what was written.
#[derive(Debug)]
pub struct Checker {
    seen: Vec<Vec<u8>>,
    rel: Vec<String>,
    pods: Vec<String>,
    unexpected: u64,
    bad_events: u64,
    wrong_meta: u64,
    delivered: u64,
    first_problem: Option<String>,
}

/// What a [`Checker`] found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Verdict {
    /// Lines written.
    pub expected: u64,
    /// Events read.
    pub delivered: u64,
    /// Written lines never delivered.
    pub missing: u64,
    /// Extra deliveries of a line already delivered.
    pub duplicated: u64,
    /// Events that are not lines we wrote (corrupt, truncated, or not ours).
    pub unexpected: u64,
    /// Events that are not valid voltail JSON.
    pub bad_events: u64,
    /// Events whose `file` or `pod` tag does not match the line's file.
    pub wrong_meta: u64,
    /// The first problem seen, for the error message.
    pub first_problem: Option<String>,
}

impl Verdict {
    /// Exactly once, nothing else.
    pub fn ok(&self) -> bool {
        self.missing == 0
            && self.duplicated == 0
            && self.unexpected == 0
            && self.bad_events == 0
            && self.wrong_meta == 0
    }

    /// One line for an error message.
    pub fn describe(&self) -> String {
        format!(
            "{} of {} lines delivered: {} missing, {} duplicated, {} unexpected, {} bad events, {} with wrong file/tags{}",
            self.delivered,
            self.expected,
            self.missing,
            self.duplicated,
            self.unexpected,
            self.bad_events,
            self.wrong_meta,
            self.first_problem
                .as_ref()
                .map(|p| format!("; first: {p}"))
                .unwrap_or_default()
        )
    }
}

impl Checker {
    /// Expects exactly the lines `tree` holds now.
    pub fn new(tree: &Tree) -> Checker {
        Checker {
            seen: tree.lines.iter().map(|n| vec![0u8; *n as usize]).collect(),
            rel: tree.rel.clone(),
            pods: (0..tree.rel.len())
                .map(|i| tree.pod_of(i).to_string())
                .collect(),
            unexpected: 0,
            bad_events: 0,
            wrong_meta: 0,
            delivered: 0,
            first_problem: None,
        }
    }

    fn problem(&mut self, what: impl FnOnce() -> String) {
        if self.first_problem.is_none() {
            self.first_problem = Some(what());
        }
    }

    /// Counts one delivered line; returns its file index when it is one of ours.
    fn count(&mut self, text: &[u8]) -> Option<usize> {
        self.delivered += 1;
        let Some(p) = parse_line(text) else {
            self.unexpected += 1;
            self.problem(|| format!("not our line: {}", String::from_utf8_lossy(text)));
            return None;
        };
        let (f, s) = (p.id.file as usize, p.id.seq as usize);
        match self.seen.get_mut(f).and_then(|v| v.get_mut(s)) {
            Some(c) => {
                *c = c.saturating_add(1);
                Some(f)
            }
            None => {
                self.unexpected += 1;
                self.problem(|| format!("line {}:{} was never written", f, s));
                None
            }
        }
    }

    /// A peer's output line, any format, as long as it contains our line.
    pub fn raw_line(&mut self, line: &[u8]) {
        if !line.iter().all(u8::is_ascii_whitespace) {
            self.count(line);
        }
    }

    /// One voltail NDJSON event.
    pub fn voltail_event(&mut self, line: &[u8]) {
        if line.is_empty() {
            return;
        }
        let ev: Event = match serde_json::from_slice(line) {
            Ok(e) => e,
            Err(e) => {
                self.delivered += 1;
                self.bad_events += 1;
                self.problem(|| format!("bad event ({e}): {}", String::from_utf8_lossy(line)));
                return;
            }
        };
        let Some(f) = self.count(ev.message.as_bytes()) else {
            return;
        };
        let pod_ok = ev.tags.get("pod").map(String::as_str) == Some(self.pods[f].as_str());
        if !ev.file.ends_with(&self.rel[f]) || !pod_ok {
            self.wrong_meta += 1;
            let rel = self.rel[f].clone();
            let tags = format!("{:?}", ev.tags);
            let file = ev.file.to_string();
            self.problem(|| format!("event for {rel} says file {file}, tags {tags}"));
        }
    }

    /// Reads every segment voltail wrote in `dir`.
    pub fn voltail_dir(&mut self, dir: &Path) -> Result<()> {
        for path in segments(dir)? {
            let f = File::open(&path).with_context(|| format!("open {}", path.display()))?;
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let reader: Box<dyn Read> = if name.ends_with(".zst") {
                Box::new(
                    zstd::stream::read::Decoder::new(f)
                        .with_context(|| format!("zstd {}", path.display()))?,
                )
            } else {
                Box::new(f)
            };
            let mut r = BufReader::with_capacity(1 << 20, reader);
            let mut line = Vec::with_capacity(1024);
            loop {
                line.clear();
                let n = r
                    .read_until(b'\n', &mut line)
                    .with_context(|| format!("read {}", path.display()))?;
                if n == 0 {
                    break;
                }
                if line.last() == Some(&b'\n') {
                    line.pop();
                }
                self.voltail_event(&line);
            }
        }
        Ok(())
    }

    /// Reads a peer's output: a file, or every file in a directory.
    pub fn raw_path(&mut self, path: &Path) -> Result<()> {
        let files = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            v.sort();
            v
        } else {
            vec![path.to_path_buf()]
        };
        for p in files {
            let f = File::open(&p).with_context(|| format!("open {}", p.display()))?;
            for line in BufReader::new(f).split(b'\n') {
                self.raw_line(&line?);
            }
        }
        Ok(())
    }

    /// The verdict.
    pub fn finish(self) -> Verdict {
        let mut v = Verdict {
            delivered: self.delivered,
            unexpected: self.unexpected,
            bad_events: self.bad_events,
            wrong_meta: self.wrong_meta,
            first_problem: self.first_problem,
            ..Default::default()
        };
        for (f, counts) in self.seen.iter().enumerate() {
            v.expected += counts.len() as u64;
            for (s, c) in counts.iter().enumerate() {
                match c {
                    0 => {
                        v.missing += 1;
                        if v.first_problem.is_none() {
                            v.first_problem = Some(format!("line {s} of {} missing", self.rel[f]));
                        }
                    }
                    1 => {}
                    n => v.duplicated += u64::from(*n) - 1,
                }
            }
        }
        v
    }
}

/// voltail's segment files in `dir`, in sequence order.
pub fn segments(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read sink dir {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("voltail-") && n.contains(".ndjson"))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Tails plain-text output files as they grow, handing out complete lines.
#[derive(Debug)]
pub struct Follower {
    path: PathBuf,
    voltail: bool,
    files: HashMap<PathBuf, (u64, Vec<u8>)>,
    buf: Vec<u8>,
}

impl Follower {
    /// Follows voltail's `.ndjson` segments in `dir` (`voltail = true`), or a peer's output
    /// file or directory.
    pub fn new(path: &Path, voltail: bool) -> Follower {
        Follower {
            path: path.to_path_buf(),
            voltail,
            files: HashMap::new(),
            buf: vec![0; 1 << 20],
        }
    }

    fn paths(&self) -> Vec<PathBuf> {
        if self.voltail {
            segments(&self.path).unwrap_or_default()
        } else if self.path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(&self.path)
                .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            v.sort();
            v
        } else if self.path.exists() {
            vec![self.path.clone()]
        } else {
            Vec::new()
        }
    }

    /// Reads what was appended since the last call; calls `f` for each new complete line.
    pub fn poll(&mut self, mut f: impl FnMut(&[u8])) -> Result<()> {
        for p in self.paths() {
            let (off, partial) = self.files.entry(p.clone()).or_default();
            let Ok(mut file) = File::open(&p) else {
                continue;
            };
            file.seek(SeekFrom::Start(*off))?;
            loop {
                let n = file.read(&mut self.buf)?;
                if n == 0 {
                    break;
                }
                *off += n as u64;
                let mut chunk = &self.buf[..n];
                while let Some(i) = chunk.iter().position(|b| *b == b'\n') {
                    if partial.is_empty() {
                        f(&chunk[..i]);
                    } else {
                        partial.extend_from_slice(&chunk[..i]);
                        f(partial);
                        partial.clear();
                    }
                    chunk = &chunk[i + 1..];
                }
                partial.extend_from_slice(chunk);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn event(tree: &Tree, line: &str, i: usize) -> String {
        serde_json::json!({
            "timestamp": "2026-11-29T21:00:00Z",
            "message": line,
            "source": "nginx",
            "file": tree.path(i).display().to_string(),
            "offset": 0,
            "tags": { "pod": tree.pod_of(i) },
        })
        .to_string()
    }

    #[test]
    fn exactly_once_passes_and_loss_and_duplicates_fail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = Tree::create(&dir.path().join("root"), 2, 2, 3000, 9).expect("tree");
        let out = dir.path().join("out");
        std::fs::create_dir(&out).expect("mkdir");
        let mut events = Vec::new();
        for i in 0..tree.rel.len() {
            let text = std::fs::read_to_string(tree.path(i)).expect("read");
            for l in text.lines() {
                events.push(event(&tree, l, i));
            }
        }
        // Half in a zstd segment (two frames), half in a plain one.
        let (a, b) = events.split_at(events.len() / 2);
        let mut z = Vec::new();
        for part in a.chunks(5) {
            z.extend(
                zstd::encode_all(format!("{}\n", part.join("\n")).as_bytes(), 1).expect("zstd"),
            );
        }
        std::fs::write(out.join("voltail-0000000001.ndjson.zst"), z).expect("write");
        std::fs::write(
            out.join("voltail-0000000002.ndjson"),
            format!("{}\n", b.join("\n")),
        )
        .expect("write");
        let mut c = Checker::new(&tree);
        c.voltail_dir(&out).expect("read");
        let v = c.finish();
        assert!(v.ok(), "{}", v.describe());
        assert_eq!(v.delivered, tree.total_lines());

        // A duplicate and a loss.
        let mut c = Checker::new(&tree);
        for e in &events[1..] {
            c.voltail_event(e.as_bytes());
        }
        c.voltail_event(events[3].as_bytes());
        let v = c.finish();
        assert_eq!((v.missing, v.duplicated), (1, 1), "{}", v.describe());
        assert!(!v.ok());

        // The wrong pod tag.
        let mut c = Checker::new(&tree);
        c.voltail_event(events[0].replace(tree.pod_of(0), "other").as_bytes());
        assert_eq!(c.finish().wrong_meta, 1);
    }

    #[test]
    fn follower_hands_out_complete_lines_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("out.log");
        let mut f = File::create(&p).expect("create");
        let mut fl = Follower::new(&p, false);
        let mut got = Vec::new();
        f.write_all(b"one\ntw").expect("write");
        fl.poll(|l| got.push(String::from_utf8_lossy(l).into_owned()))
            .expect("poll");
        f.write_all(b"o\nthree\n").expect("write");
        fl.poll(|l| got.push(String::from_utf8_lossy(l).into_owned()))
            .expect("poll");
        fl.poll(|l| got.push(String::from_utf8_lossy(l).into_owned()))
            .expect("poll");
        assert_eq!(got, ["one", "two", "three"]);
    }
}
