//! Tailing: polling tracked files, reading what they gained, following rotation.

pub mod backend;
pub mod pread;
pub mod select;
pub mod uring;

#[cfg(test)]
mod conformance;

/// A hint that a file may have changed, from outside the poll loop (the eBPF probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    /// A process on this node wrote to the file `dev`/`ino` (`dev` as `st_dev` shows it).
    Write {
        /// `st_dev` of the file.
        dev: u64,
        /// Inode.
        ino: u64,
    },
}
