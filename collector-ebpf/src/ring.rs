//! The user-space reader of the `events` ring buffer (`BPF_MAP_TYPE_RINGBUF`).
//!
//! Why not aya's `RingBuf`: it publishes the consumer position after every record. The probe
//! folds a write into an event that is still unread (consumer position not past it), so a reader
//! that publishes per record makes writers emit a fresh record for every record it reads while
//! they keep writing, each waking the reader again. This reader takes a snapshot of the
//! producer position, reads every record up to it, and publishes its position once at the end:
//! a drain costs writers at most one new record per file and CPU.
//!
//! Order that makes folding safe: a folded write completed before its exit probe saw the old
//! consumer position, so before [`Ring::drain`] published the new one, so before the caller
//! hands the drained events on. A read caused by them sees the folded write.
//!
//! It does not wait: callers `poll(2)` the map fd, which is readable while data is unread.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use aya::maps::MapData;

/// `BPF_RINGBUF_BUSY_BIT`: the record is reserved but not yet committed.
const BUSY: u32 = 1 << 31;
/// `BPF_RINGBUF_DISCARD_BIT`: the record was discarded; skip it.
const DISCARD: u32 = 1 << 30;
/// `BPF_RINGBUF_HDR_SZ`: the record header (u32 length + u32 page offset).
const HEADER: u64 = 8;

/// A mapped ring buffer. Owns the map and both mappings.
pub(crate) struct Ring {
    map: MapData,
    /// The consumer page (read-write): its first u64 is the consumer position.
    consumer: Mapping,
    /// The producer page (first u64: producer position) followed by the data area mapped twice,
    /// so a record that wraps is contiguous.
    producer: Mapping,
    page_size: usize,
    mask: u64,
}

/// One `mmap`ed region, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize, prot: i32, offset: usize) -> io::Result<Mapping> {
        let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: a fresh shared mapping of a BPF ring buffer fd at a kernel-chosen address; no
        // existing memory is affected. The result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(io::ErrorKind::InvalidData)?;
        Ok(Mapping { ptr, len })
    }

    /// The aligned u64 at `offset`, as an atomic.
    ///
    /// # Safety
    /// `offset + 8 <= len` and `offset` is a multiple of 8.
    unsafe fn u64_at(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: in bounds and aligned per the caller; the mapping is page-aligned and lives as
        // long as `self`; the kernel accesses these words atomically too.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(offset).cast::<u64>()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned and nothing borrows the mapping
        // past `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

// SAFETY: the mappings are plain shared memory owned by this value; every access goes through
// atomics or through `&mut self` (`drain`), so moving the owner to another thread is sound.
unsafe impl Send for Ring {}

impl Ring {
    /// Maps the ring buffer `map` of `size` bytes (a power of two, the map's `max_entries`).
    pub(crate) fn new(map: MapData, size: u32) -> io::Result<Ring> {
        if !size.is_power_of_two() {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: sysconf has no preconditions.
        let page_size = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| io::Error::last_os_error())?;
        let size_bytes = usize::try_from(size).map_err(|_| io::ErrorKind::InvalidInput)?;
        let fd = map.fd().as_fd();
        let consumer = Mapping::new(fd, page_size, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page_size + 2 * size_bytes, libc::PROT_READ, page_size)?;
        Ok(Ring {
            map,
            consumer,
            producer,
            page_size,
            mask: u64::from(size) - 1,
        })
    }

    /// Calls `f` with each committed record up to the producer position seen on entry (at
    /// most `max`), then publishes the new consumer position once. Returns how many records
    /// `f` saw. Stops early at a record still being written.
    pub(crate) fn drain(&mut self, max: usize, mut f: impl FnMut(&[u8])) -> usize {
        // SAFETY (both): offset 0 of each mapping, which is at least a page long.
        let consumer_pos = unsafe { self.consumer.u64_at(0) };
        let producer_pos = unsafe { self.producer.u64_at(0) };
        let start = consumer_pos.load(Ordering::Relaxed);
        let end = producer_pos.load(Ordering::Acquire);
        let mut pos = start;
        let mut n = 0;
        while pos < end && n < max {
            let at = self.page_size + usize::try_from(pos & self.mask).unwrap_or(0);
            // SAFETY: `at` is inside the first copy of the data area (pos & mask < size) and is
            // 8-aligned (records are 8-aligned in the ring); the header is 8 bytes.
            let header = unsafe {
                AtomicU32::from_ptr(self.producer.ptr.as_ptr().add(at).cast::<u32>())
                    .load(Ordering::Acquire)
            };
            if header & BUSY != 0 {
                break;
            }
            let len = header & !(BUSY | DISCARD);
            if header & DISCARD == 0 {
                let len = usize::try_from(len).unwrap_or(0);
                // The data area is mapped twice, so a record shorter than the ring never runs
                // past the second copy.
                if at + 8 + len <= self.producer.len {
                    // SAFETY: the range is inside the mapping (checked above), committed by the
                    // kernel (BUSY clear, read with Acquire) and not reused until the consumer
                    // position, published below, passes it.
                    let record = unsafe {
                        std::slice::from_raw_parts(self.producer.ptr.as_ptr().add(at + 8), len)
                    };
                    f(record);
                    n += 1;
                }
            }
            pos += (HEADER + u64::from(len)).next_multiple_of(8);
        }
        if pos != start {
            consumer_pos.store(pos, Ordering::Release);
        }
        n
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}
