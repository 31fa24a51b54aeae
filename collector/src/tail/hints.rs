//! The probe's hints to the reader: a bounded mailbox the reader thread sleeps on.
//!
//! Why not a channel: the reader sleeps on its hints between rounds, hundreds of times a second
//! under a busy probe, and `crossbeam_channel`'s blocking receive first spins and calls
//! `sched_yield` four times before it parks. On a two-core machine each yield hands the core to
//! another of our threads, so the W3-with-probe profile spent more in `sched_yield` and its
//! context switches than in reading the hinted files. Here the wait is one futex wait
//! (`Condvar::wait_timeout`), a sender only signals when the reader is asleep, and the probe
//! thread posts each drained batch under one lock instead of one message per file.
//!
//! A full mailbox drops the hint (the sender counts it): the safety poll reads the file anyway.
//!
//! The other way, the reader posts mutes: inodes whose writes it does not want for a while
//! (files no glob takes), which the probe thread hands to the kernel so that their writes cost
//! no event and no wake-up ([`HintReceiver::mute`], [`HintSender::take_mutes`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::Hint;

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    capacity: usize,
    /// The receiver was dropped: senders stop.
    gone: AtomicBool,
    /// Live senders. With none (no probe) the reader sleeps instead of waiting on the
    /// condition variable (see [`HintReceiver::wait`]).
    senders: AtomicUsize,
}

#[derive(Default)]
struct State {
    hints: Vec<Hint>,
    /// The receiver is (about to be) blocked in `wait`.
    sleeping: bool,
    /// Mutes posted by the reader, not taken by the probe thread yet.
    mutes: Vec<Mute>,
}

/// "Writes to inode `ino` of device `dev` (`st_dev`) send nothing for `span`"; a zero span
/// lifts an earlier mute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mute {
    /// `st_dev`.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// How long.
    pub span: Duration,
}

/// Mutes waiting at most; beyond that they are dropped (a dropped mute only costs the wake-ups
/// it would have saved).
const MUTES_KEPT: usize = 16_384;

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves nothing half-done (a Vec push or swap).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A mailbox holding at most `capacity` hints.
pub fn mailbox(capacity: usize) -> (HintSender, HintReceiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        ready: Condvar::new(),
        capacity: capacity.max(1),
        gone: AtomicBool::new(false),
        senders: AtomicUsize::new(1),
    });
    (
        HintSender {
            shared: Arc::clone(&shared),
        },
        HintReceiver { shared },
    )
}

/// The probe's end.
pub struct HintSender {
    shared: Arc<Shared>,
}

impl Clone for HintSender {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::SeqCst);
        HintSender {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for HintSender {
    fn drop(&mut self) {
        self.shared.senders.fetch_sub(1, Ordering::SeqCst);
        // A reader waiting for hints that can no longer come goes back to plain sleeps.
        self.shared.ready.notify_all();
    }
}

impl std::fmt::Debug for HintSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HintSender")
            .field("capacity", &self.shared.capacity)
            .finish()
    }
}

/// The receiver was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

impl HintSender {
    /// The mutes the reader posted since the last call.
    pub fn take_mutes(&self) -> Vec<Mute> {
        std::mem::take(&mut self.shared.lock().mutes)
    }

    /// Posts `hints`, waking the reader if it sleeps. Returns how many were dropped because the
    /// mailbox was full.
    pub fn send(&self, hints: impl IntoIterator<Item = Hint>) -> Result<u64, Gone> {
        if self.shared.gone.load(Ordering::Relaxed) {
            return Err(Gone);
        }
        let mut dropped = 0u64;
        let wake = {
            let mut st = self.shared.lock();
            for h in hints {
                if st.hints.len() < self.shared.capacity {
                    st.hints.push(h);
                } else {
                    dropped += 1;
                }
            }
            std::mem::take(&mut st.sleeping) && !st.hints.is_empty()
        };
        if wake {
            self.shared.ready.notify_one();
        }
        Ok(dropped)
    }
}

/// The reader's end.
pub struct HintReceiver {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for HintReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HintReceiver")
            .field("waiting", &self.shared.lock().hints.len())
            .finish()
    }
}

impl HintReceiver {
    /// Posts `mutes` for the probe thread. Without a live sender (no probe) there is no one to
    /// take them, and nothing is kept.
    pub fn mute(&self, mutes: impl IntoIterator<Item = Mute>) {
        if self.shared.senders.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut st = self.shared.lock();
        for m in mutes {
            if st.mutes.len() < MUTES_KEPT {
                st.mutes.push(m);
            }
        }
    }

    /// Moves the waiting hints to `out` without blocking.
    pub fn take(&self, out: &mut Vec<Hint>) {
        move_into(&mut self.shared.lock(), out);
    }

    /// Moves the waiting hints to `out`; when there are none, first sleeps until some are
    /// posted or `timeout` passes.
    ///
    /// Without a live sender (no probe) this is `std::thread::sleep`, a relative sleep. The
    /// condition variable's timed wait is an absolute deadline on `CLOCK_MONOTONIC` computed
    /// in user space: under a faked clock (libfaketime, `faults::monotonic_clock_jumps_*`) a
    /// day's jump made it a day-long wait, and the reader never woke.
    pub fn wait(&self, timeout: Duration, out: &mut Vec<Hint>) {
        if self.shared.senders.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(timeout);
            self.take(out);
            return;
        }
        let mut st = self.shared.lock();
        if st.hints.is_empty() {
            st.sleeping = true;
            st = match self
                .shared
                .ready
                .wait_timeout_while(st, timeout, |s| s.hints.is_empty())
            {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
            st.sleeping = false;
        }
        move_into(&mut st, out);
    }
}

/// Moves the waiting hints to `out` (by swapping buffers when `out` is empty).
fn move_into(st: &mut State, out: &mut Vec<Hint>) {
    if out.is_empty() {
        std::mem::swap(out, &mut st.hints);
    } else {
        out.append(&mut st.hints);
    }
}

impl Drop for HintReceiver {
    fn drop(&mut self) {
        self.shared.gone.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn hint(ino: u64) -> Hint {
        Hint::Write {
            dev: 1,
            ino,
            dir: 0,
            writer: None,
        }
    }

    #[test]
    fn a_post_wakes_a_sleeping_reader_at_once() {
        let (tx, rx) = mailbox(16);
        let poster = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            tx.send([hint(1), hint(2)]).expect("receiver alive")
        });
        let mut got = Vec::new();
        let started = Instant::now();
        rx.wait(Duration::from_secs(60), &mut got);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "woke by timeout"
        );
        assert_eq!(poster.join().expect("poster"), 0);
        assert_eq!(got, vec![hint(1), hint(2)]);
    }

    #[test]
    fn waiting_without_hints_returns_after_the_timeout_empty() {
        let (_tx, rx) = mailbox(16);
        let mut got = Vec::new();
        let started = Instant::now();
        rx.wait(Duration::from_millis(30), &mut got);
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert!(got.is_empty());
    }

    #[test]
    fn a_full_mailbox_drops_and_counts_and_keeps_the_first() {
        let (tx, rx) = mailbox(2);
        assert_eq!(tx.send([hint(1), hint(2), hint(3)]), Ok(1));
        assert_eq!(tx.send([hint(4)]), Ok(1));
        let mut got = vec![hint(0)];
        rx.take(&mut got);
        assert_eq!(got, vec![hint(0), hint(1), hint(2)]);
        // Taken: room again.
        assert_eq!(tx.send([hint(5)]), Ok(0));
    }

    #[test]
    fn without_senders_waiting_is_a_plain_sleep() {
        let (tx, rx) = mailbox(4);
        drop(tx);
        let mut got = Vec::new();
        let started = Instant::now();
        rx.wait(Duration::from_millis(20), &mut got);
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert!(got.is_empty());
        assert_eq!(rx.shared.senders.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn mutes_reach_the_sender_and_are_not_kept_without_one() {
        let (tx, rx) = mailbox(2);
        let m = |ino| Mute {
            dev: 1,
            ino,
            span: Duration::from_secs(60),
        };
        rx.mute([m(1), m(2)]);
        rx.mute([m(3)]);
        assert_eq!(tx.take_mutes(), vec![m(1), m(2), m(3)]);
        assert!(tx.take_mutes().is_empty());
        drop(tx);
        rx.mute([m(4)]);
        assert!(
            rx.shared.lock().mutes.is_empty(),
            "kept with no probe to take it"
        );
    }

    #[test]
    fn senders_learn_that_the_reader_is_gone() {
        let (tx, rx) = mailbox(2);
        drop(rx);
        assert_eq!(tx.send([hint(1)]), Err(Gone));
    }
}
