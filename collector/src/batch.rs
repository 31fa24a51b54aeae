//! Batches: events encoded by the sink's [`Encoder`] straight from the read buffer, grouped
//! by size, count and linger, then compressed whole.
//!
//! A [`Batch`] carries, besides its payload, everything the uploader needs after delivery: the
//! file offsets it acknowledges ([`Ack`]) and the changes to the set of tracked files
//! ([`FileUpdate`]) made since the previous batch, so the checkpoint learns of a file before the
//! first ack for it and forgets it only after the last. Each event is copied once, from the read
//! buffer into the payload (escaped on the way by the NDJSON encoder). Per-event metadata
//! ([`EventMeta`]) lets sinks that need event boundaries (Kafka messages, Loki streams) slice
//! the payload without parsing it.
//!
//! Payload and event buffers are recycled: a batch's buffers go back to [`SPARES`] when it is
//! dropped (delivered, or dead-lettered), and the next batch the reader opens takes them.
//!
//! This module does not talk to files or the network.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_queue::ArrayQueue;

use crate::checkpoint::FileUpdate;
use crate::config::Compression;
pub use crate::escape::escape_json;

/// A tracked file during one run; keys are not reused within a run.
pub type FileKey = u64;

/// Per-file data shared by all events of a file: who it is and how to render it.
#[derive(Debug)]
pub struct FileMeta {
    /// The run-local key.
    pub key: FileKey,
    /// Source name.
    pub source: Arc<str>,
    /// Path the file was found at.
    pub path: String,
    /// Named groups of the source's `path_tags`, in pattern order.
    pub tags: Vec<(String, String)>,
    /// The file's identity hash (`FileId::event_base`: fingerprint of the first bytes mixed
    /// with the inode); with the offset it makes a stable event id.
    pub fingerprint: u64,
    json_mid: Box<[u8]>,
    json_tail: Box<[u8]>,
}

impl FileMeta {
    /// Builds the metadata and pre-renders its constant JSON parts.
    pub fn new(
        key: FileKey,
        source: Arc<str>,
        path: String,
        tags: Vec<(String, String)>,
        fingerprint: u64,
    ) -> FileMeta {
        let mut mid = Vec::with_capacity(64 + path.len());
        mid.extend_from_slice(b"\",\"source\":\"");
        escape_json(source.as_bytes(), &mut mid);
        mid.extend_from_slice(b"\",\"file\":\"");
        escape_json(path.as_bytes(), &mut mid);
        mid.extend_from_slice(b"\",\"offset\":");
        let mut tail = Vec::with_capacity(64);
        tail.extend_from_slice(b",\"tags\":{");
        for (i, (k, v)) in tags.iter().enumerate() {
            if i > 0 {
                tail.push(b',');
            }
            tail.push(b'"');
            escape_json(k.as_bytes(), &mut tail);
            tail.extend_from_slice(b"\":\"");
            escape_json(v.as_bytes(), &mut tail);
            tail.push(b'"');
        }
        tail.extend_from_slice(b"}}\n");
        FileMeta {
            key,
            source,
            path,
            tags,
            fingerprint,
            json_mid: mid.into_boxed_slice(),
            json_tail: tail.into_boxed_slice(),
        }
    }

    /// Stable id of the event starting at `offset`: the same bytes get the same id on every
    /// retry and after every restart.
    pub fn event_id(&self, offset: u64) -> String {
        format!("{:016x}-{:x}", self.fingerprint, offset)
    }
}

/// Collection time, rendered once per read and shared by the events of that read.
#[derive(Debug, Clone)]
pub struct Timestamp {
    /// Nanoseconds since the Unix epoch.
    pub unix_nanos: u128,
    rfc3339: String,
}

impl Timestamp {
    /// Now.
    pub fn now() -> Timestamp {
        Timestamp::at(SystemTime::now())
    }
    /// At `t`.
    pub fn at(t: SystemTime) -> Timestamp {
        let unix_nanos = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Timestamp {
            unix_nanos,
            rfc3339: humantime::format_rfc3339_millis(t).to_string(),
        }
    }
    /// RFC 3339 with milliseconds, UTC.
    pub fn rfc3339(&self) -> &str {
        &self.rfc3339
    }
}

/// One event as the readers hand it to an encoder.
#[derive(Debug)]
pub struct Event<'a> {
    /// The line (or multiline event) without its final newline; valid UTF-8.
    pub message: &'a [u8],
    /// Byte offset of the event's first byte in its file.
    pub offset: u64,
    /// The file.
    pub meta: &'a FileMeta,
    /// Collection time.
    pub timestamp: &'a Timestamp,
}

/// Writes events in a sink's wire format.
pub trait Encoder: Send + std::fmt::Debug {
    /// Appends `ev` to `out`.
    fn encode(&mut self, ev: &Event<'_>, out: &mut Vec<u8>);
}

/// One JSON object per line:
/// `{"timestamp","message","source","file","offset","tags":{...}}`.
#[derive(Debug, Default, Clone, Copy)]
pub struct NdjsonEncoder;

impl Encoder for NdjsonEncoder {
    fn encode(&mut self, ev: &Event<'_>, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"timestamp\":\"");
        out.extend_from_slice(ev.timestamp.rfc3339.as_bytes());
        out.extend_from_slice(b"\",\"message\":\"");
        escape_json(ev.message, out);
        out.extend_from_slice(&ev.meta.json_mid);
        out.extend_from_slice(itoa::Buffer::new().format(ev.offset).as_bytes());
        out.extend_from_slice(&ev.meta.json_tail);
    }
}

/// Where an event ends in the payload and whose it is.
#[derive(Debug, Clone, Copy)]
pub struct EventMeta {
    /// End of the event's encoding in the (uncompressed) payload.
    pub end: u32,
    /// Index into [`Batch::files`].
    pub file: u32,
    /// Byte offset of the event in its file.
    pub offset: u64,
}

/// "Everything of file `key` before `offset` is in this batch or an earlier one."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The file.
    pub key: FileKey,
    /// Offset just past the last byte delivered.
    pub offset: u64,
}

/// A unit of delivery.
#[derive(Debug)]
pub struct Batch {
    /// Order of creation; the uploader applies acks in this order.
    pub seq: u64,
    /// Encoded events; compressed as `compression` says.
    pub payload: Vec<u8>,
    /// How `payload` is compressed now.
    pub compression: Compression,
    /// Payload size before compression.
    pub raw_bytes: usize,
    /// One entry per event, in payload order.
    pub events: Vec<EventMeta>,
    /// The files the events belong to.
    pub files: Vec<Arc<FileMeta>>,
    /// Offsets acknowledged once this batch is delivered (one per file, the last wins).
    pub acks: Vec<Ack>,
    /// Changes to the set of tracked files, applied before `acks`.
    pub updates: Vec<FileUpdate>,
    /// Changes applied after `acks` (releases).
    pub releases: Vec<FileUpdate>,
    /// When the first event or update entered the batch.
    pub opened: Instant,
}

/// Spent buffers on their way back from where batches end (the uploader, a sender) to where
/// they begin (the reader).
///
/// Why: a fresh megabyte from the allocator is a megabyte of page faults, paid again for
/// every batch once the allocator hands freed memory back to the kernel (glibc trims its heap
/// on free, and maps big blocks anew). On W1 those faults, and the uploader's `munmap` and
/// `brk`, were a tenth of the collector's CPU. A lock-free queue, so neither side waits; a
/// buffer that finds it full is freed as before.
#[derive(Debug)]
pub struct Spares {
    payloads: ArrayQueue<Vec<u8>>,
    events: ArrayQueue<Vec<EventMeta>>,
}

/// Buffers kept: a delivered batch's buffers come back as fast as the reader opens batches
/// while data flows, so two cover the hand-over; more would only hold memory.
const SPARE_BUFFERS: usize = 2;

/// A payload with more capacity than this is freed, not kept (a batch that outgrew its limit
/// by one huge event, or a sink's odd buffer).
const SPARE_MAX_BYTES: usize = 16 << 20;

/// The process's spare batch buffers.
pub static SPARES: LazyLock<Spares> = LazyLock::new(Spares::new);

impl Spares {
    fn new() -> Spares {
        Spares {
            payloads: ArrayQueue::new(SPARE_BUFFERS),
            events: ArrayQueue::new(SPARE_BUFFERS),
        }
    }

    /// An empty payload buffer of `cap` to `2 * cap` bytes: a spare one if one fits (a
    /// smaller one would grow, a much bigger one would hold memory the batch never uses).
    fn payload(&self, cap: usize) -> Vec<u8> {
        match self.payloads.pop() {
            Some(mut v) if (cap..2 * cap).contains(&v.capacity()) => {
                v.clear();
                v
            }
            _ => Vec::with_capacity(cap),
        }
    }

    /// An empty event list: a spare one if there is one.
    fn events(&self) -> Vec<EventMeta> {
        let mut v = self.events.pop().unwrap_or_default();
        v.clear();
        v
    }

    /// Keeps `payload` and `events` for a later batch, if there is room.
    fn put(&self, payload: Vec<u8>, events: Vec<EventMeta>) {
        if payload.capacity() > 0 && payload.capacity() <= SPARE_MAX_BYTES {
            let _ = self.payloads.push(payload);
        }
        if events.capacity() > 0 {
            let _ = self.events.push(events);
        }
    }

    /// Frees every spare buffer and hands the allocator's free memory back to the kernel (the
    /// collector went idle).
    pub fn clear(&self) {
        while self.payloads.pop().is_some() {}
        while self.events.pop().is_some() {}
        // glibc keeps freed blocks in its heaps; only the top of a heap is trimmed on free.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free pages; it takes the allocator's own locks.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    /// Spare payload buffers held now.
    pub fn len(&self) -> usize {
        self.payloads.len()
    }

    /// Whether no spare payload buffer is held.
    pub fn is_empty(&self) -> bool {
        self.payloads.is_empty()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        SPARES.put(
            std::mem::take(&mut self.payload),
            std::mem::take(&mut self.events),
        );
    }
}

impl Batch {
    /// The events' (uncompressed) payload slice for event `i`.
    pub fn event_bytes(&self, i: usize) -> &[u8] {
        let start = if i == 0 {
            0
        } else {
            self.events[i - 1].end as usize
        };
        &self.payload[start..self.events[i].end as usize]
    }
}

/// Limits that close a batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Payload bytes.
    pub max_bytes: usize,
    /// Events.
    pub max_events: usize,
    /// Age of the first event.
    pub linger: std::time::Duration,
}

/// Builds batches on the reader thread.
///
/// A batch closes as soon as it reaches a limit, even in the middle of one read: the event
/// that would go past it opens the next batch, and the closed one waits in `ready` until the
/// reader takes it. So a payload holds at most `max_bytes` plus one event and never outgrows
/// the capacity it was given (a read of 256 KiB of short lines encodes to megabytes; growing
/// the buffer then copied the whole payload, once per batch). The closed batch acks its own
/// events (the file of the last event, up to its end), as every batch must: the uploader may
/// commit the checkpoint, with the file sink's cursor, after any batch.
#[derive(Debug)]
pub struct BatchBuilder {
    limits: BatchLimits,
    encoder: Box<dyn Encoder>,
    next_seq: u64,
    /// Closed batches, oldest first, not yet taken.
    ready: std::collections::VecDeque<Batch>,
    cur: Option<Batch>,
    /// Index in `cur.files` of the file last pushed (events of one file come in runs).
    last_file: Option<(FileKey, u32)>,
    /// The file of the event last pushed and the offset just past that event.
    last_end: Option<(FileKey, u64)>,
    /// When the last batch was opened (see [`trim_spares`](Self::trim_spares)).
    last_open: Instant,
    /// Whether the spares were freed since then.
    trimmed: bool,
}

/// How long without a new batch before the spare buffers are freed.
const SPARES_IDLE: Duration = Duration::from_secs(2);

impl BatchBuilder {
    /// A builder encoding with `encoder`.
    pub fn new(limits: BatchLimits, encoder: Box<dyn Encoder>) -> BatchBuilder {
        BatchBuilder {
            limits,
            encoder,
            next_seq: 0,
            ready: std::collections::VecDeque::new(),
            cur: None,
            last_file: None,
            last_end: None,
            last_open: Instant::now(),
            trimmed: false,
        }
    }

    /// Frees the spare buffers once no batch was opened for a while: an idle collector holds
    /// no batch memory. Once per idle spell.
    pub fn trim_spares(&mut self, now: Instant) {
        if !self.trimmed
            && self.cur.is_none()
            && self.ready.is_empty()
            && now.duration_since(self.last_open) >= SPARES_IDLE
        {
            SPARES.clear();
            self.trimmed = true;
        }
    }

    /// Whether the open batch reached its size or count limit.
    fn cur_full(&self) -> bool {
        self.cur.as_ref().is_some_and(|b| {
            b.payload.len() >= self.limits.max_bytes || b.events.len() >= self.limits.max_events
        })
    }

    /// Closes the open batch into `ready`.
    fn close(&mut self) {
        if let Some(mut b) = self.cur.take() {
            self.last_file = None;
            self.last_end = None;
            self.next_seq += 1;
            b.raw_bytes = b.payload.len();
            self.ready.push_back(b);
        }
    }

    fn cur(&mut self) -> &mut Batch {
        let seq = self.next_seq;
        // An eighth for the event that crosses the limit, and room for the escape's copies,
        // which write up to a few hundred bytes past what they keep.
        let cap = self.limits.max_bytes + self.limits.max_bytes / 8 + 256;
        // (The closure captures these fields apart from `cur`.)
        let (last_open, trimmed) = (&mut self.last_open, &mut self.trimmed);
        self.cur.get_or_insert_with(|| {
            let now = Instant::now();
            *last_open = now;
            *trimmed = false;
            Batch {
                seq,
                payload: SPARES.payload(cap),
                compression: Compression::None,
                raw_bytes: 0,
                events: SPARES.events(),
                files: Vec::new(),
                acks: Vec::new(),
                updates: Vec::new(),
                releases: Vec::new(),
                opened: now,
            }
        })
    }

    /// Encodes one event into the open batch: `message`, found at `offset` of its file, which
    /// it occupies up to `end` (its newline included).
    pub fn push(
        &mut self,
        meta: &Arc<FileMeta>,
        message: &[u8],
        offset: u64,
        end: u64,
        ts: &Timestamp,
    ) {
        if self.cur_full() {
            // Closed in the middle of a read, before the reader acks it: ack what it holds.
            if let Some((key, end)) = self.last_end {
                self.ack(key, end);
            }
            self.close();
        }
        let file_idx = match self.last_file {
            Some((k, i)) if k == meta.key && self.cur.is_some() => i,
            _ => {
                let b = self.cur();
                let i = match b.files.iter().rposition(|f| Arc::ptr_eq(f, meta)) {
                    Some(i) => i as u32,
                    None => {
                        b.files.push(Arc::clone(meta));
                        (b.files.len() - 1) as u32
                    }
                };
                self.last_file = Some((meta.key, i));
                i
            }
        };
        let ev = Event {
            message,
            offset,
            meta,
            timestamp: ts,
        };
        let b = self.cur.as_mut().expect("cur() was called above");
        self.encoder.encode(&ev, &mut b.payload);
        self.last_end = Some((meta.key, end));
        b.events.push(EventMeta {
            end: b.payload.len() as u32,
            file: file_idx,
            offset,
        });
    }

    /// Records that `key` is delivered up to `offset` once the open batch is.
    pub fn ack(&mut self, key: FileKey, offset: u64) {
        let b = self.cur();
        match b.acks.iter_mut().rev().find(|a| a.key == key) {
            Some(a) => a.offset = offset,
            None => b.acks.push(Ack { key, offset }),
        }
    }

    /// Records a change to the tracked files (a release goes after the acks).
    pub fn update(&mut self, u: FileUpdate) {
        let b = self.cur();
        if matches!(u, FileUpdate::Release { .. }) {
            b.releases.push(u);
        } else {
            b.updates.push(u);
        }
    }

    /// Whether a batch is closed and waiting, or the open one reached a limit: then
    /// [`take`](Self::take) should be called until this is false.
    pub fn is_full(&self) -> bool {
        !self.ready.is_empty() || self.cur_full()
    }

    /// Whether the open batch has waited `linger`.
    pub fn is_due(&self, now: Instant) -> bool {
        self.cur
            .as_ref()
            .is_some_and(|b| now.duration_since(b.opened) >= self.limits.linger)
    }

    /// When the open batch becomes due, if there is one.
    pub fn due_at(&self) -> Option<Instant> {
        self.cur.as_ref().map(|b| b.opened + self.limits.linger)
    }

    /// Whether no batch is open or waiting.
    pub fn is_empty(&self) -> bool {
        self.cur.is_none() && self.ready.is_empty()
    }

    /// The oldest closed batch, or else the open one, closed; `None` when there is neither.
    pub fn take(&mut self) -> Option<Batch> {
        if self.ready.is_empty() {
            self.close();
        }
        self.ready.pop_front()
    }
}

/// Compresses batch payloads whole (one zstd frame per batch); runs on its own thread.
///
/// One-shot, with one context kept for every batch: the payload is contiguous, so zstd needs
/// no window of its own. (The streaming encoder used before made a context per batch and
/// copied the payload through its window in 128 KiB pieces, whose matches across a piece
/// took zstd's slower external-dictionary path: the stage ran at ~60 % of zstd's speed.)
pub struct Compressor {
    kind: Compression,
    level: i32,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("kind", &self.kind)
            .field("level", &self.level)
            .finish()
    }
}

/// Compression failed (out of memory, a bad level): the batch is sent uncompressed instead.
#[derive(Debug, thiserror::Error)]
#[error("compressing batch {seq}: {source}")]
pub struct CompressError {
    /// The batch.
    pub seq: u64,
    /// The codec's error.
    #[source]
    pub source: std::io::Error,
}

impl Compressor {
    /// A compressor producing `kind` at `level`.
    pub fn new(kind: Compression, level: i32) -> Compressor {
        Compressor {
            kind,
            level,
            zstd: None,
            scratch: Vec::new(),
        }
    }

    /// Replaces `b.payload` with its compressed form.
    pub fn compress(&mut self, b: &mut Batch) -> Result<(), CompressError> {
        if b.compression != Compression::None || self.kind == Compression::None {
            return Ok(());
        }
        self.scratch.clear();
        let res = match self.kind {
            Compression::Zstd => {
                self.scratch
                    .reserve(zstd::zstd_safe::compress_bound(b.payload.len()));
                let z = match self.zstd.as_mut() {
                    Some(z) => z,
                    None => {
                        let z = zstd::bulk::Compressor::new(self.level)
                            .map_err(|source| CompressError { seq: b.seq, source })?;
                        self.zstd.insert(z)
                    }
                };
                z.compress_to_buffer(&b.payload[..], &mut self.scratch)
                    .map(|_| ())
            }
            Compression::Gzip => {
                return Err(CompressError {
                    seq: b.seq,
                    source: std::io::Error::other("gzip is done by the sink that needs it"),
                })
            }
            Compression::None => Ok(()),
        };
        res.map_err(|source| CompressError { seq: b.seq, source })?;
        std::mem::swap(&mut b.payload, &mut self.scratch);
        b.compression = self.kind;
        // Keep the larger buffer for the next batch only if it's not excessive.
        if self.scratch.capacity() > 64 << 20 {
            self.scratch = Vec::new();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Arc<FileMeta> {
        Arc::new(FileMeta::new(
            7,
            Arc::from("nginx"),
            "/var/log/a \"q\"/access.log".into(),
            vec![
                ("pod".into(), "p-1".into()),
                ("ns".into(), "default".into()),
            ],
            0xabc,
        ))
    }

    #[test]
    fn ndjson_is_valid_json_with_every_field() {
        let m = meta();
        let ts = Timestamp::at(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1500));
        let mut out = Vec::new();
        let msg = "tab\there \"quoted\" back\\slash \u{1} ünï".as_bytes();
        NdjsonEncoder.encode(
            &Event {
                message: msg,
                offset: 42,
                meta: &m,
                timestamp: &ts,
            },
            &mut out,
        );
        let s = String::from_utf8(out).expect("utf8");
        assert!(s.ends_with("}\n"));
        assert_eq!(
            s,
            "{\"timestamp\":\"1970-01-01T00:00:01.500Z\",\"message\":\"tab\\there \\\"quoted\\\" back\\\\slash \\u0001 ünï\",\"source\":\"nginx\",\"file\":\"/var/log/a \\\"q\\\"/access.log\",\"offset\":42,\"tags\":{\"pod\":\"p-1\",\"ns\":\"default\"}}\n"
        );
    }

    #[test]
    fn builder_closes_on_limits_and_keeps_acks_per_file() {
        let limits = BatchLimits {
            max_bytes: 1024,
            max_events: 3,
            linger: std::time::Duration::from_secs(60),
        };
        let mut b = BatchBuilder::new(limits, Box::new(NdjsonEncoder));
        let m = meta();
        let ts = Timestamp::now();
        for i in 0..3 {
            assert!(!b.is_full());
            b.push(&m, b"x", i, i + 2, &ts);
            b.ack(7, i + 2);
        }
        assert!(b.is_full());
        let batch = b.take().expect("a batch");
        assert_eq!(batch.events.len(), 3);
        assert_eq!(batch.files.len(), 1);
        assert_eq!(batch.acks, vec![Ack { key: 7, offset: 4 }]);
        assert_eq!(batch.event_bytes(1).last(), Some(&b'\n'));
        assert!(b.take().is_none());
        b.ack(1, 1);
        assert_eq!(b.take().map(|b| b.seq), Some(1));
    }

    /// A spare payload of a fitting size is handed out again, pages and all; one too small or
    /// too big is not; the pool holds [`SPARE_BUFFERS`] at most.
    #[test]
    fn spare_buffers_are_reused_when_they_fit() {
        let spares = Spares::new();
        let first = spares.payload(1000);
        let at = first.as_ptr();
        spares.put(
            first,
            vec![EventMeta {
                end: 1,
                file: 0,
                offset: 0,
            }],
        );
        let again = spares.payload(1000);
        assert_eq!(again.as_ptr(), at, "the spare came back");
        assert!(again.is_empty() && again.capacity() >= 1000);
        assert!(spares.events().capacity() >= 1 && spares.events.is_empty());
        spares.put(Vec::with_capacity(100), Vec::new());
        assert!(
            spares.payload(1000).capacity() >= 1000,
            "too small: a new one"
        );
        assert!(spares.is_empty());
        spares.put(Vec::with_capacity(5000), Vec::new());
        assert!(spares.payload(1000).capacity() < 2000, "too big: a new one");
        for _ in 0..5 {
            spares.put(Vec::with_capacity(1000), Vec::new());
        }
        assert_eq!(spares.len(), SPARE_BUFFERS);
        spares.clear();
        assert!(spares.is_empty());
    }

    /// A batch closes at its limit in the middle of a read: the payload keeps the capacity it
    /// was given, and each batch acks its own events.
    #[test]
    fn builder_rolls_over_mid_read_without_growing_the_payload() {
        let limits = BatchLimits {
            max_bytes: 4096,
            max_events: 10_000,
            linger: std::time::Duration::from_secs(60),
        };
        let mut b = BatchBuilder::new(limits, Box::new(NdjsonEncoder));
        let m = meta();
        let ts = Timestamp::now();
        let line = [b'a'; 200];
        for i in 0..100 {
            b.push(&m, &line, i * 201, (i + 1) * 201, &ts);
        }
        b.ack(7, 100 * 201);
        assert!(b.is_full(), "closed batches wait to be taken");
        let mut batches = Vec::new();
        while let Some(batch) = b.take() {
            batches.push(batch);
        }
        assert!(b.is_empty() && !b.is_full());
        assert!(batches.len() > 4, "{} batches", batches.len());
        let event = batches[0].event_bytes(0).len();
        for (i, batch) in batches.iter().enumerate() {
            assert_eq!(batch.seq, i as u64);
            assert!(
                batch.payload.len() < 4096 + event,
                "batch {i}: {}",
                batch.payload.len()
            );
            // A payload is given 4096 + 512 + 256 to twice that (a spare one may be bigger);
            // growing would have doubled it at least.
            let cap = batch.payload.capacity();
            assert!((4864..2 * 4864).contains(&cap), "batch {i} grew: {cap}");
            assert_eq!(batch.raw_bytes, batch.payload.len());
        }
        let events: usize = batches.iter().map(|b| b.events.len()).sum();
        assert_eq!(events, 100);
        // Each batch acks its own events: a checkpoint may be taken after any of them.
        for batch in &batches {
            let last = batch.events.last().expect("events");
            let end = last.offset + 201;
            assert_eq!(
                batch.acks,
                vec![Ack {
                    key: 7,
                    offset: end
                }]
            );
        }
        assert_eq!(batches.last().map(|b| b.acks[0].offset), Some(100 * 201));
    }

    #[test]
    fn zstd_frame_roundtrips() {
        let mut b = BatchBuilder::new(
            BatchLimits {
                max_bytes: 1 << 20,
                max_events: 100,
                linger: std::time::Duration::ZERO,
            },
            Box::new(NdjsonEncoder),
        );
        let m = meta();
        let ts = Timestamp::now();
        b.push(&m, b"hello", 0, 6, &ts);
        let mut batch = b.take().expect("batch");
        let raw = batch.payload.clone();
        Compressor::new(Compression::Zstd, 1)
            .compress(&mut batch)
            .expect("compress");
        assert_eq!(batch.compression, Compression::Zstd);
        assert_eq!(zstd::decode_all(&batch.payload[..]).expect("decode"), raw);
    }
}
