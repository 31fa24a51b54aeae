//! Lag: bytes on disk not yet acknowledged, per source.
//!
//! The reader knows file sizes, the uploader knows acknowledged offsets; each writes its half
//! into a [`LagBoard`] (one lock per poll round or per batch, never per line) and the reader
//! publishes the per-source sums as `voltail_lag_bytes` about once a second.

use std::sync::Mutex;

use crate::batch::FileKey;
use crate::FastMap;

#[derive(Debug, Default, Clone, Copy)]
struct Row {
    source: usize,
    size: u64,
    acked: u64,
}

/// Sizes and acknowledged offsets by file.
#[derive(Debug, Default)]
pub struct LagBoard {
    rows: Mutex<FastMap<FileKey, Row>>,
}

impl LagBoard {
    /// Starts a row for a file the reader begins tracking: its size and the offset before
    /// which everything counts as delivered (a checkpoint's, or where reading starts).
    ///
    /// Called by the reader before anything of the file is handed on, so that no ack for it
    /// can arrive first and be ignored.
    pub fn track(&self, key: FileKey, source: usize, size: u64, acked: u64) {
        if let Ok(mut rows) = self.rows.lock() {
            rows.insert(
                key,
                Row {
                    source,
                    size,
                    acked,
                },
            );
        }
    }

    /// Records sizes seen by the reader: `(key, source, size)`; keys not tracked (released)
    /// are ignored.
    pub fn sizes(&self, it: impl IntoIterator<Item = (FileKey, usize, u64)>) {
        if let Ok(mut rows) = self.rows.lock() {
            for (k, source, size) in it {
                if let Some(r) = rows.get_mut(&k) {
                    r.source = source;
                    r.size = size;
                }
            }
        }
    }

    /// Records acknowledged offsets: `(key, offset)`; unknown keys are ignored.
    pub fn acked(&self, it: impl IntoIterator<Item = (FileKey, u64)>) {
        if let Ok(mut rows) = self.rows.lock() {
            for (k, off) in it {
                if let Some(r) = rows.get_mut(&k) {
                    r.acked = off;
                }
            }
        }
    }

    /// Forgets a released file.
    pub fn remove(&self, key: FileKey) {
        if let Ok(mut rows) = self.rows.lock() {
            rows.remove(&key);
        }
    }

    /// Unacknowledged bytes per source index (`sources` long).
    pub fn per_source(&self, sources: usize) -> Vec<u64> {
        let mut out = vec![0u64; sources];
        if let Ok(rows) = self.rows.lock() {
            for r in rows.values() {
                if let Some(s) = out.get_mut(r.source) {
                    *s += r.size.saturating_sub(r.acked);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_size_minus_acked_per_source() {
        let b = LagBoard::default();
        b.track(1, 0, 0, 0);
        b.track(2, 1, 0, 0);
        b.track(3, 0, 0, 0);
        b.sizes([(1, 0, 100), (2, 1, 50), (3, 0, 10), (8, 0, 1000)]);
        b.acked([(1, 40), (9, 5)]);
        assert_eq!(b.per_source(2), vec![70, 50]);
        b.remove(3);
        assert_eq!(b.per_source(2), vec![60, 50]);
        b.sizes([(3, 0, 20)]);
        assert_eq!(
            b.per_source(2),
            vec![60, 50],
            "a released file stays off the board"
        );
    }

    #[test]
    fn tracked_file_starts_at_its_delivered_offset() {
        let b = LagBoard::default();
        b.track(1, 0, 100, 100);
        assert_eq!(b.per_source(1), vec![0]);
        b.acked([(1, 100)]);
        b.sizes([(1, 0, 150)]);
        assert_eq!(b.per_source(1), vec![50]);
    }
}
