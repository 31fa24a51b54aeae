//! The checkpoint: per tracked file, its identity, path and acknowledged offset, plus the
//! sink's cursor, kept in an mmap'd file in `data_dir` (on the shared volume).
//!
//! [`State`] is the in-memory view, changed only by the uploader as batches are acknowledged
//! ([`FileUpdate`]s and acks), so it never runs ahead of delivery. [`Store`] makes a `State`
//! durable. The file holds two *slots*; each write goes to the slot not holding the newest
//! generation and is `msync`ed, so a write torn by a crash leaves the previous generation
//! intact. Each slot and each record carries a CRC: a damaged file is detected, and whatever
//! records still check out are salvaged. Every `BACKUP_EVERY` writes a copy goes to
//! `checkpoint.bak` (write + fsync + rename), the last resort when the whole file is damaged.
//! What was loaded, and from where, is reported as a [`LoadOutcome`].
//!
//! Layout (little-endian): a 4 KiB header page (`magic`, `version`, `slot_cap`), then slot A at
//! 4096 and slot B at `4096 + slot_cap`. A slot: `magic u32, version u32, generation u64,
//! payload_len u64, payload_crc u32, header_crc u32`, then the payload: `cursor_len u32,
//! cursor, count u32`, then records `len u32, crc u32, dev u64, ino u64, fp u64, fp_len u32,
//! offset u64, source_len u16, source, path_len u32, path`.
//!
//! This module does not decide which offsets to resume from: the tailer matches entries to files.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use memmap2::MmapMut;

use crate::batch::FileKey;
use crate::identity::FileId;
use crate::FastMap;

const MAGIC: u32 = 0x564f_4c54; // "VOLT"
/// Format version written by this build.
pub const VERSION: u32 = 1;
const HEADER: usize = 4096;
const SLOT_HEADER: usize = 32;
const RECORD_FIXED: usize = 8 + 8 + 8 + 8 + 4 + 8 + 2 + 4;
const MIN_SLOT: usize = 64 * 1024;
const BACKUP_EVERY: u64 = 30;
/// Name of the checkpoint file in `data_dir`.
pub const FILE_NAME: &str = "checkpoint.bin";
/// Name of the backup copy in `data_dir`.
pub const BACKUP_NAME: &str = "checkpoint.bak";

/// Checkpoint failures. Loading never fails on bad content (that is a [`LoadOutcome`]); these
/// are IO failures writing it.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// An IO call on the checkpoint failed.
    #[error("checkpoint {path}: {op}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> CheckpointError + 'a {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// A change to the set of tracked files, carried through the pipeline in batch order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileUpdate {
    /// Start tracking `key`; everything before `offset` counts as delivered already.
    Track {
        /// The run-local key.
        key: FileKey,
        /// Identity.
        id: FileId,
        /// Path.
        path: String,
        /// Source name.
        source: String,
        /// Starting acknowledged offset.
        offset: u64,
    },
    /// The file is now known under another path (rotated).
    Rename {
        /// The file.
        key: FileKey,
        /// New path.
        path: String,
    },
    /// The file's identity changed (fingerprint grew, or it was truncated and starts anew).
    Identity {
        /// The file.
        key: FileKey,
        /// New identity.
        id: FileId,
        /// Acknowledged offset under the new identity (`None`: unchanged).
        offset: Option<u64>,
    },
    /// Stop tracking (fully read and gone).
    Release {
        /// The file.
        key: FileKey,
    },
}

/// One tracked file as the checkpoint knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Identity.
    pub id: FileId,
    /// Last known path.
    pub path: String,
    /// Source name.
    pub source: String,
    /// Everything before this offset is acknowledged by the sink.
    pub offset: u64,
}

/// The in-memory checkpoint.
#[derive(Debug, Default)]
pub struct State {
    /// Tracked files by run-local key.
    pub entries: FastMap<FileKey, Entry>,
    /// The sink's cursor as of the last commit.
    pub cursor: Vec<u8>,
    dirty: bool,
}

impl State {
    /// Applies one update.
    pub fn apply(&mut self, u: &FileUpdate) {
        self.dirty = true;
        match u {
            FileUpdate::Track {
                key,
                id,
                path,
                source,
                offset,
            } => {
                self.entries.insert(
                    *key,
                    Entry {
                        id: *id,
                        path: path.clone(),
                        source: source.clone(),
                        offset: *offset,
                    },
                );
            }
            FileUpdate::Rename { key, path } => {
                if let Some(e) = self.entries.get_mut(key) {
                    e.path.clone_from(path);
                }
            }
            FileUpdate::Identity { key, id, offset } => {
                if let Some(e) = self.entries.get_mut(key) {
                    e.id = *id;
                    if let Some(o) = offset {
                        e.offset = *o;
                    }
                }
            }
            FileUpdate::Release { key } => {
                self.entries.remove(key);
            }
        }
    }

    /// Moves `key`'s acknowledged offset.
    pub fn ack(&mut self, key: FileKey, offset: u64) {
        if let Some(e) = self.entries.get_mut(&key) {
            if e.offset != offset {
                e.offset = offset;
                self.dirty = true;
            }
        }
    }

    /// Sets the sink cursor.
    pub fn set_cursor(&mut self, cursor: Vec<u8>) {
        if cursor != self.cursor {
            self.cursor = cursor;
            self.dirty = true;
        }
    }

    /// Whether anything changed since the last [`State::mark_clean`].
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Marks the state as written.
    pub fn mark_clean(&mut self) {
        self.dirty = false;
    }
}

/// What a load found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadOutcome {
    /// No checkpoint: this is the very first start.
    Fresh,
    /// The newest slot was intact.
    Clean {
        /// Its generation.
        generation: u64,
    },
    /// The newest data was damaged; something older or partial was used instead.
    Recovered {
        /// What was wrong.
        problem: String,
        /// What was used: `older slot`, `salvaged records`, `backup`.
        from: &'static str,
    },
    /// Nothing usable was left: files are read again per the start policy.
    Lost {
        /// What was wrong.
        problem: String,
    },
}

/// A loaded checkpoint.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The entries (keys are not stored; the tailer assigns new ones).
    pub entries: Vec<Entry>,
    /// The sink cursor, when trustworthy.
    pub cursor: Option<Vec<u8>>,
    /// What was found.
    pub outcome: LoadOutcome,
    /// Generation of the data used.
    pub generation: u64,
}

/// Encodes `state` as a slot payload into `out`.
fn encode_payload(state: &State, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&(state.cursor.len() as u32).to_le_bytes());
    out.extend_from_slice(&state.cursor);
    out.extend_from_slice(&(state.entries.len() as u32).to_le_bytes());
    for e in state.entries.values() {
        let source = &e.source.as_bytes()[..e.source.len().min(u16::MAX as usize)];
        let len = RECORD_FIXED + source.len() + e.path.len();
        let start = out.len();
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&e.id.dev.to_le_bytes());
        out.extend_from_slice(&e.id.ino.to_le_bytes());
        out.extend_from_slice(&e.id.fp.to_le_bytes());
        out.extend_from_slice(&e.id.fp_len.to_le_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&(source.len() as u16).to_le_bytes());
        out.extend_from_slice(source);
        out.extend_from_slice(&(e.path.len() as u32).to_le_bytes());
        out.extend_from_slice(e.path.as_bytes());
        let crc = crc32fast::hash(&out[start + 8..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

fn decode_record(rec: &[u8]) -> Option<Entry> {
    let mut r = Reader { b: rec, pos: 0 };
    let dev = r.u64()?;
    let ino = r.u64()?;
    let fp = r.u64()?;
    let fp_len = r.u32()?;
    let offset = r.u64()?;
    let sl = r.u16()? as usize;
    let source = String::from_utf8(r.take(sl)?.to_vec()).ok()?;
    let pl = r.u32()? as usize;
    let path = String::from_utf8(r.take(pl)?.to_vec()).ok()?;
    if r.pos != rec.len() || fp_len as usize > crate::identity::FINGERPRINT_BYTES {
        return None;
    }
    Some(Entry {
        id: FileId {
            dev,
            ino,
            fp,
            fp_len,
        },
        path,
        source,
        offset,
    })
}

/// Decodes a payload. `strict`: every record must check out; otherwise bad records are
/// skipped and counted. Returns (cursor, entries, bad records).
fn decode_payload(p: &[u8], strict: bool) -> Option<(Vec<u8>, Vec<Entry>, usize)> {
    let mut r = Reader { b: p, pos: 0 };
    let cl = r.u32()? as usize;
    let cursor = r.take(cl)?.to_vec();
    let count = r.u32()? as usize;
    let mut entries = Vec::with_capacity(count.min(1 << 20));
    let mut bad = 0;
    for _ in 0..count {
        let Some(len) = r.u32() else {
            bad += 1;
            break;
        };
        let crc = r.u32()?;
        let Some(body) = (len as usize).checked_sub(8).and_then(|n| r.take(n)) else {
            bad += 1;
            break;
        };
        match (crc32fast::hash(body) == crc)
            .then(|| decode_record(body))
            .flatten()
        {
            Some(e) => entries.push(e),
            None if strict => return None,
            None => bad += 1,
        }
    }
    if strict && (bad > 0 || r.pos != p.len()) {
        return None;
    }
    let missing = count.saturating_sub(entries.len() + bad);
    Some((cursor, entries, bad + missing))
}

/// What one slot holds.
#[derive(Debug)]
enum Slot {
    Valid {
        generation: u64,
        cursor: Vec<u8>,
        entries: Vec<Entry>,
    },
    /// The header is fine but the payload is damaged; these records checked out.
    Damaged {
        generation: u64,
        entries: Vec<Entry>,
        bad: usize,
    },
    WrongVersion(u32),
    Invalid,
}

fn read_slot(b: &[u8]) -> Slot {
    let Some(h) = b.get(..SLOT_HEADER) else {
        return Slot::Invalid;
    };
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    if u32_at(0) != MAGIC || crc32fast::hash(&h[..28]) != u32_at(28) {
        return Slot::Invalid;
    }
    if u32_at(4) != VERSION {
        return Slot::WrongVersion(u32_at(4));
    }
    let generation = u64_at(8);
    let len = u64_at(16);
    let payload = usize::try_from(len)
        .ok()
        .and_then(|l| b.get(SLOT_HEADER..SLOT_HEADER.checked_add(l)?));
    let Some(payload) = payload else {
        // Truncated file: salvage what is there.
        let rest = &b[SLOT_HEADER..];
        return match decode_payload(rest, false) {
            Some((_, entries, bad)) => Slot::Damaged {
                generation,
                entries,
                bad: bad.max(1),
            },
            None => Slot::Invalid,
        };
    };
    if crc32fast::hash(payload) == u32_at(24) {
        if let Some((cursor, entries, _)) = decode_payload(payload, true) {
            return Slot::Valid {
                generation,
                cursor,
                entries,
            };
        }
    }
    match decode_payload(payload, false) {
        Some((_, entries, bad)) => Slot::Damaged {
            generation,
            entries,
            bad: bad.max(1),
        },
        None => Slot::Damaged {
            generation,
            entries: Vec::new(),
            bad: 1,
        },
    }
}

fn slot_bounds(len: usize, header: &[u8]) -> Vec<(usize, usize)> {
    let mut caps = Vec::new();
    if header.len() >= 16 && u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) == MAGIC
    {
        let cap = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes")) as usize;
        caps.push(cap);
    }
    if len > HEADER {
        caps.push((len - HEADER) / 2);
    }
    let mut out = Vec::new();
    for cap in caps {
        if cap < SLOT_HEADER {
            continue;
        }
        for start in [HEADER, HEADER.saturating_add(cap)] {
            let end = start.saturating_add(cap).min(len);
            if start < len && !out.contains(&(start, end)) {
                out.push((start, end));
            }
        }
    }
    out
}

/// Parses a whole checkpoint file image. `None` when nothing in it is usable.
fn parse_image(b: &[u8]) -> Result<Loaded, String> {
    let header = &b[..b.len().min(HEADER)];
    let mut best_valid: Option<(u64, Vec<u8>, Vec<Entry>)> = None;
    let mut best_damaged: Option<(u64, Vec<Entry>, usize)> = None;
    let mut wrong_version = None;
    let mut newest_gen_seen = 0u64;
    for (s, e) in slot_bounds(b.len(), header) {
        match read_slot(&b[s..e]) {
            Slot::Valid {
                generation,
                cursor,
                entries,
            } => {
                newest_gen_seen = newest_gen_seen.max(generation);
                if best_valid.as_ref().is_none_or(|(g, _, _)| generation > *g) {
                    best_valid = Some((generation, cursor, entries));
                }
            }
            Slot::Damaged {
                generation,
                entries,
                bad,
            } => {
                newest_gen_seen = newest_gen_seen.max(generation);
                if best_damaged
                    .as_ref()
                    .is_none_or(|(g, _, _)| generation > *g)
                {
                    best_damaged = Some((generation, entries, bad));
                }
            }
            Slot::WrongVersion(v) => wrong_version = Some(v),
            Slot::Invalid => {}
        }
    }
    match (best_valid, best_damaged) {
        (Some((generation, cursor, entries)), damaged) => {
            let outcome = match damaged {
                Some((dg, _, bad)) if dg > generation => LoadOutcome::Recovered {
                    problem: format!(
                        "newest slot (generation {dg}) is damaged ({bad} bad records)"
                    ),
                    from: "older slot",
                },
                _ if generation < newest_gen_seen => LoadOutcome::Recovered {
                    problem: "newest slot is damaged".into(),
                    from: "older slot",
                },
                _ => LoadOutcome::Clean { generation },
            };
            Ok(Loaded {
                entries,
                cursor: Some(cursor),
                outcome,
                generation,
            })
        }
        (None, Some((generation, entries, bad))) if !entries.is_empty() => Ok(Loaded {
            outcome: LoadOutcome::Recovered {
                problem: format!(
                    "both slots damaged; {bad} records lost, {} salvaged",
                    entries.len()
                ),
                from: "salvaged records",
            },
            entries,
            cursor: None,
            generation,
        }),
        _ => Err(match wrong_version {
            Some(v) => format!("unsupported checkpoint version {v} (this build reads {VERSION})"),
            None if b.is_empty() => "empty file".to_string(),
            None => format!("no valid slot in {} bytes", b.len()),
        }),
    }
}

/// Reads the checkpoint in `data_dir` without changing anything (for `voltail checkpoint`).
pub fn read_only(data_dir: &Path) -> Result<Loaded, CheckpointError> {
    let path = data_dir.join(FILE_NAME);
    let bak = data_dir.join(BACKUP_NAME);
    let (loaded, _) = load_images(&path, &bak)?;
    Ok(loaded)
}

/// Loads from `path`, falling back to `bak`. Returns whether `path` must be moved aside.
fn load_images(path: &Path, bak: &Path) -> Result<(Loaded, bool), CheckpointError> {
    let main = match std::fs::read(path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(path, "read")(e)),
    };
    let Some(main) = main else {
        // No main file: a backup alone means the main was lost (deleted by hand?).
        if let Ok(b) = std::fs::read(bak) {
            if let Ok(mut l) = parse_image(&b) {
                l.outcome = LoadOutcome::Recovered {
                    problem: format!("{} is missing", FILE_NAME),
                    from: "backup",
                };
                return Ok((l, false));
            }
        }
        return Ok((
            Loaded {
                entries: Vec::new(),
                cursor: None,
                outcome: LoadOutcome::Fresh,
                generation: 0,
            },
            false,
        ));
    };
    let problem = match parse_image(&main) {
        Ok(l) => {
            if let LoadOutcome::Recovered {
                from: "salvaged records",
                problem,
            } = &l.outcome
            {
                // A backup that is intact beats partial records.
                if let Some(mut b) = std::fs::read(bak).ok().and_then(|b| parse_image(&b).ok()) {
                    if matches!(b.outcome, LoadOutcome::Clean { .. })
                        && b.entries.len() >= l.entries.len()
                    {
                        b.outcome = LoadOutcome::Recovered {
                            problem: problem.clone(),
                            from: "backup",
                        };
                        return Ok((b, true));
                    }
                }
                return Ok((l, true));
            }
            return Ok((l, false));
        }
        Err(p) => p,
    };
    if let Some(mut l) = std::fs::read(bak).ok().and_then(|b| parse_image(&b).ok()) {
        l.outcome = LoadOutcome::Recovered {
            problem,
            from: "backup",
        };
        return Ok((l, true));
    }
    Ok((
        Loaded {
            entries: Vec::new(),
            cursor: None,
            outcome: LoadOutcome::Lost { problem },
            generation: 0,
        },
        true,
    ))
}

/// The checkpoint file, mapped.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    bak: PathBuf,
    map: MmapMut,
    slot_cap: usize,
    /// Generation held by slot A and slot B (0 = empty or damaged).
    gens: [u64; 2],
    scratch: Vec<u8>,
    writes: u64,
    last_write: Option<SystemTime>,
}

impl Store {
    /// Opens (or creates) the checkpoint in `data_dir` and loads it. A damaged file is moved
    /// aside as `checkpoint.bin.corrupt-<unix seconds>` and a new one started from what loaded.
    pub fn open(data_dir: &Path) -> Result<(Store, Loaded), CheckpointError> {
        let path = data_dir.join(FILE_NAME);
        let bak = data_dir.join(BACKUP_NAME);
        let (loaded, move_aside) = load_images(&path, &bak)?;
        if move_aside {
            let secs = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let aside = data_dir.join(format!("{FILE_NAME}.corrupt-{secs}"));
            std::fs::rename(&path, &aside)
                .map_err(io_err(&path, "move damaged checkpoint aside"))?;
        }
        let mut state = State::default();
        for (i, e) in loaded.entries.iter().enumerate() {
            state.entries.insert(i as u64, e.clone());
        }
        state.cursor = loaded.cursor.clone().unwrap_or_default();
        let generation = loaded.generation;
        let mut store = match (
            move_aside,
            OpenOptions::new().read(true).write(true).open(&path),
        ) {
            (false, Ok(f)) => Store::map_existing(&path, &bak, f, generation)?,
            _ => Store::create(&path, &bak, &state, generation + 1, MIN_SLOT)?,
        };
        store.writes = 1;
        Ok((store, loaded))
    }

    fn map_existing(
        path: &Path,
        bak: &Path,
        f: File,
        generation: u64,
    ) -> Result<Store, CheckpointError> {
        let len = f.metadata().map_err(io_err(path, "stat"))?.len() as usize;
        if len < HEADER + 2 * SLOT_HEADER {
            drop(f);
            return Store::create(path, bak, &State::default(), generation + 1, MIN_SLOT);
        }
        // SAFETY: the file is ours (the data_dir lock is held); nobody else truncates it while mapped.
        let map = unsafe { MmapMut::map_mut(&f) }.map_err(io_err(path, "mmap"))?;
        let slot_cap = (len - HEADER) / 2;
        let mut gens = [0u64; 2];
        for (i, g) in gens.iter_mut().enumerate() {
            let s = HEADER + i * slot_cap;
            if let Slot::Valid { generation, .. } = read_slot(&map[s..s + slot_cap]) {
                *g = generation;
            }
        }
        Ok(Store {
            path: path.to_path_buf(),
            bak: bak.to_path_buf(),
            map,
            slot_cap,
            gens,
            scratch: Vec::new(),
            writes: 0,
            last_write: None,
        })
    }

    /// Writes a fresh file holding `state` in slot A, atomically (tmp + fsync + rename).
    fn create(
        path: &Path,
        bak: &Path,
        state: &State,
        generation: u64,
        min_cap: usize,
    ) -> Result<Store, CheckpointError> {
        let mut payload = Vec::new();
        encode_payload(state, &mut payload);
        let cap = (SLOT_HEADER + payload.len())
            .max(min_cap)
            .next_power_of_two();
        let image = build_image(cap, generation, &payload);
        write_atomically(path, &image)?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path, "open"))?;
        let mut s = Store::map_existing(path, bak, f, generation)?;
        s.gens = [generation, 0];
        s.last_write = Some(SystemTime::now());
        Ok(s)
    }

    /// Makes `state` durable. The previous generation stays intact until this one is.
    pub fn write(&mut self, state: &State) -> Result<(), CheckpointError> {
        let mut payload = std::mem::take(&mut self.scratch);
        encode_payload(state, &mut payload);
        let generation = self.gens[0].max(self.gens[1]) + 1;
        if SLOT_HEADER + payload.len() > self.slot_cap {
            let grown = Store::create(
                &self.path,
                &self.bak,
                state,
                generation,
                2 * (SLOT_HEADER + payload.len()),
            )?;
            *self = Store {
                scratch: payload,
                writes: self.writes,
                ..grown
            };
        } else {
            let i = if self.gens[0] <= self.gens[1] { 0 } else { 1 };
            let start = HEADER + i * self.slot_cap;
            let slot = &mut self.map[start..start + SLOT_HEADER + payload.len()];
            // Invalidate the slot's header first, so a crash mid-copy is never mistaken for valid.
            slot[..4].copy_from_slice(&0u32.to_le_bytes());
            slot[SLOT_HEADER..].copy_from_slice(&payload);
            let h = slot_header(generation, &payload);
            slot[..SLOT_HEADER].copy_from_slice(&h);
            self.map
                .flush_range(start, SLOT_HEADER + payload.len())
                .map_err(io_err(&self.path, "msync"))?;
            self.gens[i] = generation;
            self.scratch = payload;
        }
        self.writes += 1;
        self.last_write = Some(SystemTime::now());
        if self.writes % BACKUP_EVERY == 0 {
            let image = build_image(
                (SLOT_HEADER + self.scratch.len())
                    .max(MIN_SLOT)
                    .next_power_of_two(),
                generation,
                &self.scratch,
            );
            write_atomically(&self.bak, &image)?;
        }
        Ok(())
    }

    /// When the last successful write happened.
    pub fn last_write(&self) -> Option<SystemTime> {
        self.last_write
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn slot_header(generation: u64, payload: &[u8]) -> [u8; SLOT_HEADER] {
    let mut h = [0u8; SLOT_HEADER];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&generation.to_le_bytes());
    h[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[24..28].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let c = crc32fast::hash(&h[..28]);
    h[28..32].copy_from_slice(&c.to_le_bytes());
    h
}

fn build_image(cap: usize, generation: u64, payload: &[u8]) -> Vec<u8> {
    let mut image = vec![0u8; HEADER + 2 * cap];
    image[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    image[4..8].copy_from_slice(&VERSION.to_le_bytes());
    image[8..16].copy_from_slice(&(cap as u64).to_le_bytes());
    image[HEADER..HEADER + SLOT_HEADER].copy_from_slice(&slot_header(generation, payload));
    image[HEADER + SLOT_HEADER..HEADER + SLOT_HEADER + payload.len()].copy_from_slice(payload);
    image
}

/// Writes `bytes` to `path` via a temporary file, fsync and rename, then fsyncs the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp, "create"))?;
    f.write_all(bytes).map_err(io_err(&tmp, "write"))?;
    f.sync_all().map_err(io_err(&tmp, "fsync"))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(path, "rename"))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(n: u64) -> State {
        let mut s = State::default();
        for k in 0..n {
            s.apply(&FileUpdate::Track {
                key: k,
                id: FileId {
                    dev: 1,
                    ino: 100 + k,
                    fp: k * 7,
                    fp_len: 256,
                },
                path: format!("/var/log/nginx/pod-{k}/access.log"),
                source: "nginx".into(),
                offset: k * 1000,
            });
        }
        s.set_cursor(vec![1, 2, 3]);
        s
    }

    fn sorted(mut v: Vec<Entry>) -> Vec<Entry> {
        v.sort_by_key(|e| e.id.ino);
        v
    }

    #[test]
    fn roundtrip_and_generations() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut store, l) = Store::open(d.path()).expect("open");
        assert_eq!(l.outcome, LoadOutcome::Fresh);
        let mut s = state(3);
        store.write(&s).expect("write");
        s.ack(1, 5555);
        store.write(&s).expect("write");
        drop(store);
        let (_, l) = Store::open(d.path()).expect("reopen");
        assert!(
            matches!(l.outcome, LoadOutcome::Clean { .. }),
            "{:?}",
            l.outcome
        );
        assert_eq!(l.cursor, Some(vec![1, 2, 3]));
        let e = sorted(l.entries);
        assert_eq!(e.len(), 3);
        assert_eq!(e[1].offset, 5555);
    }

    #[test]
    fn grows_past_slot_capacity() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut store, _) = Store::open(d.path()).expect("open");
        let s = state(5000);
        store.write(&s).expect("write big");
        store.write(&s).expect("write big again");
        let l = read_only(d.path()).expect("read");
        assert_eq!(l.entries.len(), 5000);
    }

    #[test]
    fn torn_write_at_every_offset_keeps_previous_generation() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut store, _) = Store::open(d.path()).expect("open");
        let old = state(4);
        store.write(&old).expect("w1");
        let mut new = state(4);
        new.ack(2, 99_999);
        // The slot the next write goes to, and the image it would hold.
        let i = if store.gens[0] <= store.gens[1] { 0 } else { 1 };
        let start = HEADER + i * store.slot_cap;
        let before = std::fs::read(store.path()).expect("read");
        let mut payload = Vec::new();
        encode_payload(&new, &mut payload);
        let gen = store.gens[0].max(store.gens[1]) + 1;
        let header = slot_header(gen, &payload);
        // The real order: magic zeroed, payload copied byte by byte, then the header.
        let mut steps: Vec<Vec<u8>> = Vec::new();
        let mut img = before.clone();
        img[start..start + 4].copy_from_slice(&0u32.to_le_bytes());
        steps.push(img.clone());
        for (j, b) in payload.iter().enumerate() {
            img[start + SLOT_HEADER + j] = *b;
            steps.push(img.clone());
        }
        for (j, b) in header.iter().enumerate() {
            img[start + j] = *b;
            steps.push(img.clone());
        }
        let last = steps.len() - 1;
        for (n, img) in steps.iter().enumerate() {
            let l = parse_image(img).expect("an intact generation remains");
            let got = sorted(l.entries);
            let want = if n == last { 99_999 } else { 2000 };
            assert_eq!(got[2].offset, want, "torn after step {n}");
        }
    }

    #[test]
    fn garbage_and_truncation_and_version_are_reported_not_fatal() {
        let d = tempfile::tempdir().expect("tmp");
        let (mut store, _) = Store::open(d.path()).expect("open");
        let s = state(50);
        for _ in 0..BACKUP_EVERY {
            store.write(&s).expect("write");
        }
        drop(store);
        let path = d.path().join(FILE_NAME);
        let full = std::fs::read(&path).expect("read");

        // Truncated in the middle of slot A's records: salvage or backup, never an error.
        std::fs::write(&path, &full[..HEADER + 2000]).expect("truncate");
        let (_, l) = Store::open(d.path()).expect("open truncated");
        assert!(
            matches!(l.outcome, LoadOutcome::Recovered { .. }),
            "{:?}",
            l.outcome
        );
        assert_eq!(l.entries.len(), 50, "backup has all entries");

        // Random bytes everywhere: the backup is used.
        let mut rnd = vec![0u8; full.len()];
        let mut r = fastrand::Rng::with_seed(7);
        r.fill(&mut rnd);
        std::fs::write(&path, &rnd).expect("garbage");
        let (_, l) = Store::open(d.path()).expect("open garbage");
        assert_eq!(
            l.outcome,
            LoadOutcome::Recovered {
                problem: format!("no valid slot in {} bytes", rnd.len()),
                from: "backup"
            }
        );
        assert!(d.path().read_dir().expect("ls").any(|e| e
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .starts_with("checkpoint.bin.corrupt-")));

        // Wrong version and no backup: lost, loudly.
        std::fs::remove_file(d.path().join(BACKUP_NAME)).expect("rm bak");
        let mut img = build_image(MIN_SLOT, 9, b"\0\0\0\0\0\0\0\0");
        img[HEADER + 4..HEADER + 8].copy_from_slice(&7u32.to_le_bytes());
        let c = crc32fast::hash(&img[HEADER..HEADER + 28]);
        img[HEADER + 28..HEADER + 32].copy_from_slice(&c.to_le_bytes());
        std::fs::write(&path, &img).expect("v7");
        let (mut store, l) = Store::open(d.path()).expect("open v7");
        assert_eq!(
            l.outcome,
            LoadOutcome::Lost {
                problem: "unsupported checkpoint version 7 (this build reads 1)".into()
            }
        );
        store.write(&s).expect("a new checkpoint works after loss");
    }

    #[test]
    fn damaged_record_is_skipped_and_others_salvaged() {
        let s = state(10);
        let mut payload = Vec::new();
        encode_payload(&s, &mut payload);
        let mut img = build_image(MIN_SLOT, 1, &payload);
        // Flip a byte inside the third record's path.
        let hits: Vec<usize> = img
            .windows(4)
            .enumerate()
            .filter(|(_, w)| w == b"pod-")
            .map(|(i, _)| i)
            .collect();
        img[hits[2] + 1] ^= 0xff;
        let l = parse_image(&img).expect("salvage");
        assert_eq!(l.entries.len(), 9);
        assert!(matches!(
            l.outcome,
            LoadOutcome::Recovered {
                from: "salvaged records",
                ..
            }
        ));
        assert_eq!(l.cursor, None, "a damaged slot's cursor is not trusted");
    }
}
