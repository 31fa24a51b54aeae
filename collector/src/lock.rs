//! One owner per `data_dir`: an exclusive lock on `data_dir/voltail.lock`.
//!
//! The lock is an open-file-description lock (`F_OFD_SETLK`, falling back to a classic POSIX
//! `F_SETLK` where OFD locks are refused); on NFS both are forwarded to the server's lock
//! manager, unlike `flock` on old clients, and the server releases them when the holder dies
//! (after its lease expires). The holder writes who it is into the file, so a waiting instance
//! can say whom it waits for. A second instance waits (a rolling update never ships twice).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Name of the lock file in `data_dir`.
pub const LOCK_NAME: &str = "voltail.lock";

/// Lock failures other than "someone else holds it".
#[derive(Debug, thiserror::Error)]
#[error("lock {path}: {source}")]
pub struct LockError {
    /// The lock file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// The held lock; released on drop (and by the kernel when the process dies).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

fn try_lock(f: &File) -> std::io::Result<bool> {
    for cmd in [libc::F_OFD_SETLK, libc::F_SETLK] {
        // SAFETY: flock is plain old data; all-zero is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        // SAFETY: a valid descriptor and a valid flock pointer for the duration of the call.
        let rc = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => return Ok(false),
            Some(libc::EINVAL) if cmd == libc::F_OFD_SETLK => continue,
            _ => return Err(e),
        }
    }
    Ok(false)
}

/// Takes the lock, waiting while another instance holds it. `waiting` is called with the
/// holder's description whenever it changes. Returns `None` if `stop` was set while waiting.
pub fn acquire(
    data_dir: &Path,
    stop: &AtomicBool,
    mut waiting: impl FnMut(&str),
) -> Result<Option<DataDirLock>, LockError> {
    let path = data_dir.join(LOCK_NAME);
    let err = |source| LockError {
        path: path.clone(),
        source,
    };
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(err)?;
    let mut last = String::new();
    loop {
        if try_lock(&f).map_err(err)? {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let who = format!(
                "pid {} on {} since {}\n",
                std::process::id(),
                host.trim(),
                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            );
            f.set_len(0).map_err(err)?;
            f.rewind().map_err(err)?;
            f.write_all(who.as_bytes()).map_err(err)?;
            let _ = f.sync_all();
            return Ok(Some(DataDirLock { _file: f }));
        }
        let mut holder = String::new();
        let _ = f.rewind();
        let _ = (&f).take(4096).read_to_string(&mut holder);
        let holder = holder.trim().to_string();
        if holder != last {
            waiting(if holder.is_empty() {
                "unknown holder"
            } else {
                &holder
            });
            last = holder;
        }
        for _ in 0..10 {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn second_holder_waits_until_first_releases() {
        let d = tempfile::tempdir().expect("tmp");
        let never = AtomicBool::new(false);
        let first = acquire(d.path(), &never, |_| {})
            .expect("lock")
            .expect("held");
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = d.path().to_path_buf();
        let s2 = Arc::clone(&stop);
        let t = std::thread::spawn(move || {
            acquire(&dir, &s2, |who| {
                let _ = tx.send(who.to_string());
            })
            .expect("lock")
            .is_some()
        });
        let who = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("told whom it waits for");
        assert!(
            who.starts_with(&format!("pid {}", std::process::id())),
            "{who}"
        );
        drop(first);
        assert!(t.join().expect("join"), "acquired after release");
        let _second = acquire(d.path(), &never, |_| {});
    }

    #[test]
    fn stop_ends_the_wait() {
        let d = tempfile::tempdir().expect("tmp");
        let never = AtomicBool::new(false);
        let _first = acquire(d.path(), &never, |_| {})
            .expect("lock")
            .expect("held");
        let stop = AtomicBool::new(true);
        assert!(acquire(d.path(), &stop, |_| {}).expect("ok").is_none());
    }
}
