//! Running a list of blocking filesystem calls on several threads at once.
//!
//! On a network filesystem every `stat`, `open` or directory listing is a round trip, and the
//! server answers many of them at once (an NFS client keeps dozens of RPCs in flight). Calls
//! made one after the other cost one round trip each; [`map`] overlaps them. On a local disk
//! the same calls take microseconds and threads would only add their own cost, so callers pass
//! a thread count of 1 there.
//!
//! This module knows nothing of files; it does not keep threads between calls (each call
//! spawns scoped threads, which costs tens of microseconds against the round trips it saves).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Below this many items, calls run on the caller's thread.
pub const PARALLEL_MIN: usize = 8;

/// `f` of every item, in the items' order, on up to `threads` threads (at least
/// [`PARALLEL_MIN`] items per thread's share, and never more threads than that allows).
pub fn map<T, R, F>(items: &[T], threads: usize, f: F) -> Vec<R>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> R + Sync,
{
    let threads = threads.min(items.len() / PARALLEL_MIN);
    if threads < 2 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut slots: Vec<Option<R>> = Vec::new();
    slots.resize_with(items.len(), || None);
    let slots = Mutex::new(slots);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                slots.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
            });
        }
    });
    slots
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|r| r.expect("every index below items.len() was taken by one thread"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_keep_the_items_order_on_any_thread_count() {
        let items: Vec<u32> = (0..1000).collect();
        for threads in [1, 2, 7, 64] {
            let out = map(&items, threads, |x| x * 2);
            assert_eq!(out, items.iter().map(|x| x * 2).collect::<Vec<_>>());
        }
        assert!(map(&[] as &[u32], 8, |x| *x).is_empty());
    }

    #[test]
    fn calls_overlap_when_threads_are_given() {
        // Each call waits until two are running at once: it finishes only if they overlap.
        let running = AtomicUsize::new(0);
        let items = [0u8; 16];
        let out = map(&items, 2, |_| {
            running.fetch_add(1, Ordering::SeqCst);
            while running.load(Ordering::SeqCst) < 2 {
                std::thread::yield_now();
            }
            true
        });
        assert!(out.into_iter().all(|b| b));
    }
}
