//! The file sink: batches appended to numbered segment files in a directory.
//!
//! Segments are `voltail-<seq>.ndjson.zst` (one zstd frame per batch, so a partly written
//! segment still decompresses up to its last whole frame) or `voltail-<seq>.ndjson`, and roll
//! at `segment_max_bytes`. The sink takes part in the checkpoint: `commit` fsyncs and returns
//! the cursor (segment, length, and a tag of the directory and format); `recover` truncates the
//! segment back to that length and deletes later segments. Whatever was written after the last
//! checkpoint is therefore removed and read again from the files, so after a crash at any
//! instant the output holds every line exactly once.
//!
//! Written bytes do not stay in the page cache: every [`WRITE_BEHIND`] bytes the sink starts
//! the writeback of that chunk, waits for the chunk before it (started a chunk ago, so
//! normally done) and drops it from the cache, and a commit drops what its fsync cleaned. A
//! collector shipping gigabytes would otherwise fill the page cache, which is charged to its
//! pod's memory cgroup and evicts what the node's applications cache; and on a virtual machine
//! whose memory the host backs lazily, writing into ever new page-cache pages cost ten times
//! the CPU of reusing the few just dropped (measured: 6.6 s against 0.6 s of system time for
//! 2.6 GB).
//!
//! A failed writeback (the write-behind's or a commit's fsync) means written pages may be lost,
//! and the kernel says so to a descriptor once only. From then on every commit fails: the
//! checkpoint stays before the loss until a restart truncates back to it and writes again.
//!
//! It does not rotate old segments away: that is the consumer's job.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{Sink, SinkError, SinkErrorKind};
use crate::batch::Batch;
use crate::config::{Compression, FileSinkConfig};

const PREFIX: &str = "voltail-";

/// Chunk of a segment handed to writeback at once, and dropped from the page cache a chunk
/// later.
pub const WRITE_BEHIND: u64 = 8 << 20;

/// Appends batches to segment files.
#[derive(Debug)]
pub struct FileSink {
    dir: PathBuf,
    ext: &'static str,
    max_bytes: u64,
    tag: u64,
    seq: u64,
    len: u64,
    file: Option<File>,
    dir_dirty: bool,
    /// Segment offset up to which writeback was started (a multiple of `WRITE_BEHIND`).
    behind: u64,
    /// Segment offset below which the page cache was dropped (a multiple of `WRITE_BEHIND`).
    dropped: u64,
    /// Set when a writeback (the write-behind's or a commit's fsync) failed: written pages
    /// may be lost, and the kernel reports that to a descriptor once only, so a later fsync
    /// would succeed over the hole. Every commit fails from then on, the checkpoint stays
    /// before the loss, and a restart truncates the segment back to it and reads again.
    lost: Option<String>,
}

fn err(kind: SinkErrorKind, reason: &'static str, message: String) -> SinkError {
    SinkError {
        sink: "file",
        kind,
        reason,
        message,
        retry_after: None,
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> SinkError {
    // A full or read-only disk may be fixed by an operator: retry rather than give up.
    err(
        SinkErrorKind::Transient,
        "io",
        format!("{what} {}: {e}", path.display()),
    )
}

impl FileSink {
    /// Creates the directory if needed; nothing is opened until `recover`.
    pub fn open(cfg: &FileSinkConfig) -> Result<FileSink, SinkError> {
        std::fs::create_dir_all(&cfg.path).map_err(|e| io("create directory", &cfg.path, e))?;
        let ext = match cfg.compression {
            Compression::Zstd => "ndjson.zst",
            _ => "ndjson",
        };
        let tag = xxhash_rust::xxh3::xxh3_64(format!("{}\0{ext}", cfg.path.display()).as_bytes());
        Ok(FileSink {
            dir: cfg.path.clone(),
            ext,
            max_bytes: cfg.segment_max_bytes,
            tag,
            seq: 0,
            len: 0,
            file: None,
            dir_dirty: false,
            behind: 0,
            dropped: 0,
            lost: None,
        })
    }

    /// Path of segment `seq`.
    pub fn segment_path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{PREFIX}{seq:010}.{}", self.ext))
    }

    /// Sequence numbers of the segments in the directory (any format), sorted.
    fn segments(&self) -> Result<Vec<(u64, PathBuf)>, SinkError> {
        let rd = std::fs::read_dir(&self.dir).map_err(|e| io("list", &self.dir, e))?;
        let mut out = Vec::new();
        for ent in rd.flatten() {
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(rest) = name.strip_prefix(PREFIX) else {
                continue;
            };
            let Some((num, _)) = rest.split_once('.') else {
                continue;
            };
            if let Ok(seq) = num.parse::<u64>() {
                out.push((seq, ent.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn open_segment(&mut self, seq: u64, len: u64) -> Result<(), SinkError> {
        let path = self.segment_path(seq);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io("open", &path, e))?;
        f.set_len(len).map_err(|e| io("truncate", &path, e))?;
        // Whatever was cached of the old segment was dropped by its last commit.
        self.file = Some(f);
        self.seq = seq;
        self.len = len;
        self.behind = len - len % WRITE_BEHIND;
        self.dropped = self.behind;
        self.dir_dirty = true;
        Ok(())
    }

    /// Starts the writeback of each whole chunk written since the last call and drops the
    /// chunk before it from the page cache, once its writeback is done.
    fn write_behind(&mut self) {
        let Some(f) = &self.file else { return };
        let fd = f.as_raw_fd();
        while self.len >= self.behind + WRITE_BEHIND {
            let mut res = sync_range(fd, self.behind, libc::SYNC_FILE_RANGE_WRITE);
            self.behind += WRITE_BEHIND;
            if res.is_ok() && self.behind >= self.dropped + 2 * WRITE_BEHIND {
                let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER;
                res = sync_range(fd, self.dropped, wait);
                if res.is_ok() {
                    drop_cache(f, self.dropped, WRITE_BEHIND);
                    self.dropped += WRITE_BEHIND;
                }
            }
            if let Err(e) = res {
                self.writeback_failed(e);
                return;
            }
        }
    }

    fn writeback_failed(&mut self, e: std::io::Error) {
        let path = self.segment_path(self.seq);
        tracing::error!(segment = %path.display(), error = %e,
            "sink writeback failed: output since the last checkpoint may be lost; checkpoints stop until voltail restarts, which writes it again");
        self.lost
            .get_or_insert(format!("writeback {}: {e}", path.display()));
    }

    fn sync(&mut self) -> Result<(), SinkError> {
        if let Some(m) = &self.lost {
            return Err(err(
                SinkErrorKind::Transient,
                "io",
                format!("{m} (restart voltail to write it again)"),
            ));
        }
        if let Some(f) = &self.file {
            if let Err(e) = f.sync_data() {
                self.writeback_failed(e);
                return self.sync();
            }
            // Clean now: drop it (a partly filled last page stays).
            drop_cache(f, self.dropped, self.len - self.dropped);
        }
        if self.dir_dirty {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("fsync directory", &self.dir, e))?;
            self.dir_dirty = false;
        }
        Ok(())
    }
}

/// `sync_file_range` of the `WRITE_BEHIND` bytes of `fd` from `off`.
fn sync_range(fd: std::os::fd::RawFd, off: u64, flags: libc::c_uint) -> std::io::Result<()> {
    // SAFETY: plain syscall on a descriptor the caller owns; no memory is passed.
    let rc = unsafe {
        libc::sync_file_range(
            fd,
            off as libc::off64_t,
            WRITE_BEHIND as libc::off64_t,
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Drops the clean cached pages of `f` in `off..off + len` (advice: nothing fails).
fn drop_cache(f: &File, off: u64, len: u64) {
    // SAFETY: plain syscall on a descriptor the caller owns; no memory is passed.
    unsafe {
        libc::posix_fadvise(
            f.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

fn encode_cursor(tag: u64, seq: u64, len: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(24);
    c.extend_from_slice(&tag.to_le_bytes());
    c.extend_from_slice(&seq.to_le_bytes());
    c.extend_from_slice(&len.to_le_bytes());
    c
}

fn decode_cursor(c: &[u8]) -> Option<(u64, u64, u64)> {
    if c.len() != 24 {
        return None;
    }
    let n = |i: usize| u64::from_le_bytes(c[i..i + 8].try_into().expect("8 bytes"));
    Some((n(0), n(8), n(16)))
}

impl Sink for FileSink {
    fn name(&self) -> &'static str {
        "file"
    }

    fn recover(&mut self, cursor: Option<&[u8]>) -> Result<(), SinkError> {
        let segs = self.segments()?;
        match cursor.and_then(decode_cursor) {
            Some((tag, seq, len)) if tag == self.tag => {
                // Undo what was written after the checkpoint: it will be read again.
                for (s, p) in segs.iter().filter(|(s, _)| *s > seq) {
                    tracing::info!(segment = %p.display(), seq = s, "removing segment written after the checkpoint");
                    std::fs::remove_file(p).map_err(|e| io("remove", p, e))?;
                }
                let path = self.segment_path(seq);
                let have = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                if have < len {
                    tracing::error!(segment = %path.display(), expected = len, found = have,
                        "sink segment is shorter than the checkpoint says: output was lost outside voltail");
                }
                self.open_segment(seq, len.min(have))?;
            }
            other => {
                if other.is_some() {
                    tracing::warn!(dir = %self.dir.display(), "sink cursor is for another directory or format; starting a new segment");
                }
                let next = segs.last().map(|(s, _)| s + 1).unwrap_or(0);
                self.open_segment(next, 0)?;
            }
        }
        self.sync()
    }

    fn send(&mut self, batch: &Batch) -> Result<(), SinkError> {
        if batch.payload.is_empty() {
            return Ok(());
        }
        if batch.compression != Compression::None && self.ext == "ndjson" {
            return Err(err(
                SinkErrorKind::Permanent,
                "format",
                "compressed batch for an uncompressed sink".into(),
            ));
        }
        if self.file.is_none() {
            self.recover(None)?;
        }
        if self.len > 0 && self.len + batch.payload.len() as u64 > self.max_bytes {
            self.sync()?;
            let next = self.seq + 1;
            self.open_segment(next, 0)?;
        }
        let f = self.file.as_ref().expect("a segment is open");
        if let Err(e) = f.write_all_at(&batch.payload, self.len) {
            // Never leave a partial frame behind: the retry writes it whole at the same place.
            let _ = f.set_len(self.len);
            return Err(io("write", &self.segment_path(self.seq), e));
        }
        self.len += batch.payload.len() as u64;
        self.write_behind();
        Ok(())
    }

    fn has_cursor(&self) -> bool {
        true
    }

    fn commit(&mut self) -> Result<Vec<u8>, SinkError> {
        self.sync()?;
        Ok(encode_cursor(self.tag, self.seq, self.len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchBuilder, BatchLimits, FileMeta, NdjsonEncoder, Timestamp};
    use std::sync::Arc;

    fn batch(lines: &[&str]) -> Batch {
        let mut b = BatchBuilder::new(
            BatchLimits {
                max_bytes: 1 << 20,
                max_events: 1000,
                linger: std::time::Duration::ZERO,
            },
            Box::new(NdjsonEncoder),
        );
        let m = Arc::new(FileMeta::new(1, Arc::from("s"), "/f".into(), vec![], 0));
        let ts = Timestamp::now();
        for (i, l) in lines.iter().enumerate() {
            b.push(&m, l.as_bytes(), i as u64, i as u64 + 1, &ts);
        }
        b.take().expect("batch")
    }

    fn cfg(dir: &Path, compression: Compression, seg: u64) -> FileSinkConfig {
        FileSinkConfig {
            path: dir.to_path_buf(),
            compression,
            compression_level: 1,
            segment_max_bytes: seg,
            concurrency: 1,
        }
    }

    fn all_output(dir: &Path) -> String {
        let mut segs: Vec<_> = std::fs::read_dir(dir)
            .expect("ls")
            .map(|e| e.expect("e").path())
            .collect();
        segs.sort();
        segs.iter()
            .map(|p| std::fs::read_to_string(p).expect("read"))
            .collect()
    }

    #[test]
    fn recover_truncates_to_cursor_and_drops_later_segments() {
        let d = tempfile::tempdir().expect("tmp");
        let mut s = FileSink::open(&cfg(d.path(), Compression::None, 4096)).expect("open");
        s.recover(None).expect("recover");
        s.send(&batch(&["a", "b"])).expect("send");
        let cursor = s.commit().expect("commit");
        for _ in 0..40 {
            s.send(&batch(&["after checkpoint"])).expect("send");
        }
        assert!(s.seq > 0, "rolled to more segments");
        drop(s);
        let mut s = FileSink::open(&cfg(d.path(), Compression::None, 4096)).expect("reopen");
        s.recover(Some(&cursor)).expect("recover");
        let out = all_output(d.path());
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(!out.contains("after checkpoint"));
        s.send(&batch(&["c"])).expect("send");
        assert_eq!(all_output(d.path()).lines().count(), 3);
    }

    #[test]
    fn fresh_start_never_touches_existing_segments() {
        let d = tempfile::tempdir().expect("tmp");
        let mut s = FileSink::open(&cfg(d.path(), Compression::None, 1 << 20)).expect("open");
        s.recover(None).expect("recover");
        s.send(&batch(&["x"])).expect("send");
        s.commit().expect("commit");
        let mut s2 = FileSink::open(&cfg(d.path(), Compression::None, 1 << 20)).expect("open");
        s2.recover(Some(&[1, 2, 3])).expect("foreign cursor");
        assert_eq!(s2.seq, 1);
        assert_eq!(all_output(d.path()).lines().count(), 1);
    }

    /// After a failed writeback no commit succeeds (a second fsync would, over the hole).
    #[test]
    fn a_failed_writeback_stops_every_later_commit() {
        let d = tempfile::tempdir().expect("tmp");
        let mut s = FileSink::open(&cfg(d.path(), Compression::None, 1 << 20)).expect("open");
        s.recover(None).expect("recover");
        s.send(&batch(&["a"])).expect("send");
        s.commit().expect("commit");
        s.writeback_failed(std::io::Error::from_raw_os_error(libc::EIO));
        for _ in 0..2 {
            s.send(&batch(&["b"])).expect("sends go on");
            let e = s.commit().expect_err("no commit after the loss");
            assert!(e.message.contains("restart"), "{e}");
        }
    }

    /// Pages of `path` in the page cache.
    fn resident_pages(path: &Path) -> usize {
        use std::os::fd::AsRawFd;
        let f = File::open(path).expect("open segment");
        let len = f.metadata().expect("stat").len() as usize;
        let mut pages = vec![0u8; len.div_ceil(4096)];
        // SAFETY: a read-only shared mapping of a file this test holds open, unmapped before
        // returning; mincore writes one byte per page of it into `pages`, which has that many.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED, "mmap");
            let rc = libc::mincore(p, len, pages.as_mut_ptr());
            libc::munmap(p, len);
            assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        }
        pages.iter().filter(|b| **b & 1 != 0).count()
    }

    /// Written chunks leave the page cache a chunk behind the writer, and the rest at commit;
    /// the output is whole.
    #[test]
    fn written_segments_leave_the_page_cache() {
        let d = tempfile::tempdir().expect("tmp");
        let fs = crate::tail::select::fs_kind(d.path()).map(|k| k.name());
        if fs == Some("tmpfs") {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI's temp directory is tmpfs"
            );
            println!(
                "skipped: {} is tmpfs, whose pages are the files",
                d.path().display()
            );
            return;
        }
        let mut s = FileSink::open(&cfg(d.path(), Compression::None, 1 << 30)).expect("open");
        s.recover(None).expect("recover");
        let line = "x".repeat(1000);
        let lines: Vec<&str> = vec![&line; 1000];
        let chunks = 5 * WRITE_BEHIND as usize;
        let (mut sent, mut events) = (0, 0);
        while sent < chunks {
            let b = batch(&lines);
            sent += b.payload.len();
            events += b.events.len();
            s.send(&b).expect("send");
        }
        let path = s.segment_path(0);
        let chunk_pages = WRITE_BEHIND as usize / 4096;
        let resident = resident_pages(&path);
        assert!(
            resident <= 3 * chunk_pages,
            "{resident} pages cached of {}",
            sent / 4096
        );
        s.commit().expect("commit");
        let resident = resident_pages(&path);
        assert!(resident <= 1, "{resident} pages cached after the commit");
        let out = all_output(d.path());
        assert_eq!(out.len(), sent);
        assert_eq!(out.lines().count(), events);
    }
}
