//! File identity: device + inode, plus a fingerprint of the file's first bytes.
//!
//! Inode numbers are reused after a delete (often at once on NFS), and device numbers change
//! across remounts, so neither alone says "this is the file we were reading". A [`FileId`] adds
//! the xxh3 hash of the first `fp_len` bytes (`fp_len` grows with the file up to
//! [`FINGERPRINT_BYTES`]). Two ids name the same file when the inodes match and the file still
//! starts with the fingerprinted bytes; the device is only a tie-breaker ([`FileId::matches`]).
//!
//! This module only computes and compares; reading the prefix is the caller's job.

/// How many leading bytes the fingerprint covers once the file is long enough.
pub const FINGERPRINT_BYTES: usize = 256;

/// Who a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FileId {
    /// `st_dev` when last seen (informative: it changes across remounts).
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// xxh3 of the first `fp_len` bytes (0 when `fp_len` is 0).
    pub fp: u64,
    /// Bytes the fingerprint covers, `0..=FINGERPRINT_BYTES`.
    pub fp_len: u32,
}

/// How well a file on disk matches a remembered id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Match {
    /// Another file.
    No,
    /// Same inode and fingerprint, other device (remount).
    OtherDevice,
    /// Same device, inode and fingerprint.
    Exact,
}

/// Fingerprint of a prefix.
pub fn fingerprint(prefix: &[u8]) -> u64 {
    if prefix.is_empty() {
        0
    } else {
        xxhash_rust::xxh3::xxh3_64(prefix)
    }
}

impl FileId {
    /// The id of a file with `dev`/`ino` whose first bytes (as many as were read, up to
    /// [`FINGERPRINT_BYTES`]) are `prefix`.
    pub fn new(dev: u64, ino: u64, prefix: &[u8]) -> FileId {
        let prefix = &prefix[..prefix.len().min(FINGERPRINT_BYTES)];
        FileId {
            dev,
            ino,
            fp: fingerprint(prefix),
            fp_len: prefix.len() as u32,
        }
    }

    /// The base of this file's stable event ids: the fingerprint mixed with the inode, so that
    /// two files with the same first bytes (copies, identical content) never share ids, while
    /// ids survive restarts and remounts (the device number is left out: it changes).
    pub fn event_base(&self) -> u64 {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.fp.to_le_bytes());
        b[8..].copy_from_slice(&self.ino.to_le_bytes());
        xxhash_rust::xxh3::xxh3_64(&b)
    }

    /// Whether the fingerprint can still grow (the file was shorter than the full prefix).
    pub fn fingerprint_incomplete(&self) -> bool {
        (self.fp_len as usize) < FINGERPRINT_BYTES
    }

    /// Compares with a file now at `dev`/`ino` whose first `self.fp_len` bytes are `prefix`
    /// (`prefix` shorter than `fp_len` means the file shrank: another file, or truncated).
    pub fn matches(&self, dev: u64, ino: u64, prefix: &[u8]) -> Match {
        if ino != self.ino || prefix.len() < self.fp_len as usize {
            return Match::No;
        }
        if fingerprint(&prefix[..self.fp_len as usize]) != self.fp {
            return Match::No;
        }
        if dev == self.dev {
            Match::Exact
        } else {
            Match::OtherDevice
        }
    }
}

impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}/{:016x}",
            libc::major(self.dev),
            libc::minor(self.dev),
            self.ino,
            self.fp
        )?;
        if self.fingerprint_incomplete() {
            write!(f, "@{}", self.fp_len)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_inode_new_content_is_another_file() {
        let id = FileId::new(1, 42, b"first line of the old file\n");
        assert_eq!(
            id.matches(1, 42, b"first line of the old file\nmore"),
            Match::Exact
        );
        assert_eq!(
            id.matches(9, 42, b"first line of the old file\n"),
            Match::OtherDevice
        );
        assert_eq!(
            id.matches(1, 42, b"another file reusing the inode\n"),
            Match::No
        );
        assert_eq!(
            id.matches(1, 43, b"first line of the old file\n"),
            Match::No
        );
        assert_eq!(
            id.matches(1, 42, b"first"),
            Match::No,
            "shrunk below the fingerprint"
        );
    }

    #[test]
    fn event_ids_differ_for_identical_files_and_ignore_the_device() {
        let a = FileId::new(1, 10, b"same first line\n");
        let b = FileId::new(1, 11, b"same first line\n");
        assert_ne!(a.event_base(), b.event_base());
        assert_eq!(
            a.event_base(),
            FileId::new(99, 10, b"same first line\n").event_base()
        );
    }

    #[test]
    fn empty_file_matches_by_inode() {
        let id = FileId::new(1, 5, b"");
        assert_eq!(id.fp_len, 0);
        assert_eq!(id.matches(1, 5, b""), Match::Exact);
        assert!(id.fingerprint_incomplete());
    }

    #[test]
    fn prefix_is_capped() {
        let long = vec![b'a'; 1000];
        let id = FileId::new(1, 1, &long);
        assert_eq!(id.fp_len as usize, FINGERPRINT_BYTES);
        assert!(!id.fingerprint_incomplete());
        assert_eq!(id.matches(1, 1, &long[..FINGERPRINT_BYTES]), Match::Exact);
    }
}
