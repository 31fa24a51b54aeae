//! The `pread` backends: each op is one plain syscall, made in order on the calling thread
//! ([`PreadBackend`]) or spread over a few threads ([`PreadPool`]).
//!
//! On a warm local disk the sequential backend is the fastest way (measured: plain syscalls beat
//! io_uring there). On a network filesystem each call costs a round trip, which is what the
//! io_uring backend avoids; where io_uring is refused, [`PreadPool`] keeps several calls in
//! flight at once instead, the way an NFS client's slot table would be filled. Neither ever fails
//! to start, so they are also the fallback when io_uring is refused.
//!
//! The pool spawns scoped threads per batch (about 15 µs each, against a round trip of a
//! millisecond or more per call it overlaps) and runs nothing between batches: it holds no
//! threads, queues or buffers while the tailer sleeps.

use std::sync::{Mutex, PoisonError};

use super::backend::{pread, statx_fd, statx_path, ReadBackend, ReadOp, StatOp};

/// Plain syscalls, one after another.
#[derive(Debug, Default)]
pub struct PreadBackend;

impl ReadBackend for PreadBackend {
    fn name(&self) -> &'static str {
        "pread"
    }

    fn stat_batch(&mut self, ops: &mut [StatOp<'_>]) {
        ops.iter_mut().for_each(stat_one);
    }

    fn read_batch(&mut self, ops: &mut [ReadOp<'_>]) {
        ops.iter_mut().for_each(read_one);
    }
}

fn stat_one(op: &mut StatOp<'_>) {
    op.fd_stat = statx_fd(op.fd);
    if let Some(p) = op.path {
        op.path_stat = statx_path(p);
    }
}

fn read_one(op: &mut ReadOp<'_>) {
    op.result = pread(op.fd, op.buf, op.offset);
}

/// Plain syscalls on up to `threads` threads at once (the calling thread is one of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreadPool {
    threads: usize,
}

impl Default for PreadPool {
    fn default() -> Self {
        PreadPool::new(PreadPool::DEFAULT_THREADS)
    }
}

impl PreadPool {
    /// Threads used when not told otherwise: enough to cover a millisecond of latency for
    /// thousands of files per round, few enough to stay cheap on a small node.
    pub const DEFAULT_THREADS: usize = 16;

    /// A pool of `threads` threads (clamped to 1..=256).
    pub fn new(threads: usize) -> Self {
        PreadPool {
            threads: threads.clamp(1, 256),
        }
    }

    /// How many threads a batch may use.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Applies `f` to every op, `threads` threads taking small chunks from a shared queue so that
    /// a slow call delays only its own chunk.
    fn run<T: Send>(&self, ops: &mut [T], f: fn(&mut T)) {
        // Small chunks balance uneven latencies; at least a few per thread.
        let chunk = (ops.len() / (self.threads * 4)).clamp(1, 32);
        let workers = self.threads.min(ops.len().div_ceil(chunk));
        if workers <= 1 {
            ops.iter_mut().for_each(f);
            return;
        }
        let queue = Mutex::new(ops.chunks_mut(chunk));
        let work = || loop {
            // A poisoned lock only means another worker panicked; the iterator is still sound.
            let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
            match next {
                Some(c) => c.iter_mut().for_each(f),
                None => break,
            }
        };
        std::thread::scope(|s| {
            for _ in 1..workers {
                let spawned = std::thread::Builder::new()
                    .name("voltail-pread".into())
                    .spawn_scoped(s, work);
                if let Err(e) = spawned {
                    // Fewer threads only make the batch slower; the calling thread still works.
                    tracing::warn!(error = %e, "cannot spawn pread thread");
                    break;
                }
            }
            work();
        });
    }
}

impl ReadBackend for PreadPool {
    fn name(&self) -> &'static str {
        "pread_pool"
    }

    fn stat_batch(&mut self, ops: &mut [StatOp<'_>]) {
        self.run(ops, stat_one);
    }

    fn read_batch(&mut self, ops: &mut [ReadOp<'_>]) {
        self.run(ops, read_one);
    }
}
