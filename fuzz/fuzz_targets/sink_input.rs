//! The input of the sink encoder targets, derived from the fuzzer's bytes: one or two files
//! (path, source, two tags, fingerprint) and up to 16 events spread over them, with offsets
//! and collection times, encoded into one batch by the production `BatchBuilder`.
//!
//! Byte 0 holds flags: bit 0 = two files, bits 1-3 pick the second tag's name (names a
//! `path_tags` group can have, including ones that collide with the sinks' own fields),
//! bits 4-7 the variant a target tests (its config). The rest, read as UTF-8 (lossy), is
//! fields separated by `\u{1}`: messages (separated by `\u{2}`), path, source, first tag
//! value, second tag value, template.
#![allow(dead_code, reason = "each target uses a part of it")]

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use voltail::batch::{Batch, BatchBuilder, BatchLimits, Encoder, FileMeta, Timestamp};

/// Names the second tag can have: `path_tags` group names, so `[A-Za-z0-9_]`.
pub const TAG_NAMES: [&str; 8] = [
    "pod", "app", "file", "message", "source", "id", "__path__", "tags",
];

/// One event as it went into the batch.
pub struct In {
    pub file: usize,
    pub message: String,
    pub offset: u64,
    pub ts: Timestamp,
}

/// What went into the batch, to compare the decoded output with.
pub struct Input {
    pub files: Vec<Arc<FileMeta>>,
    pub events: Vec<In>,
    pub template: String,
    /// Bits 4-7 of byte 0.
    pub variant: u8,
}

impl Input {
    pub fn parse(data: &[u8]) -> Input {
        let flags = data.first().copied().unwrap_or(0);
        let text = String::from_utf8_lossy(data.get(1..).unwrap_or_default());
        let mut parts = text.split('\u{1}');
        let messages = parts.next().unwrap_or_default();
        let path = parts.next().unwrap_or("/p").to_string();
        let source = parts.next().unwrap_or("s");
        let v1 = parts.next().unwrap_or("default").to_string();
        let v2 = parts.next().unwrap_or("x").to_string();
        let template = parts.next().unwrap_or("logs-{ns}").to_string();
        let tag2 = TAG_NAMES[(flags >> 1 & 7) as usize].to_string();
        let fp = (data.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut files = vec![Arc::new(FileMeta::new(
            1,
            Arc::from(source),
            path.clone(),
            vec![("ns".into(), v1.clone()), (tag2.clone(), v2.clone())],
            fp,
        ))];
        if flags & 1 == 1 {
            // Another file of the same source: the tags swapped, so it lands in another stream.
            files.push(Arc::new(FileMeta::new(
                2,
                Arc::from(source),
                format!("{path}.1"),
                vec![("ns".into(), v2), (tag2, v1)],
                !fp,
            )));
        }
        let mut offsets: Vec<u64> = files.iter().map(|f| f.fingerprint >> 20).collect();
        let base = 1_700_000_000_000_000_000u128 + u128::from(fp % 1_000_000_007);
        let events = messages
            .split('\u{2}')
            .take(16)
            .enumerate()
            .map(|(i, m)| {
                let file = (i + m.len()) % files.len();
                let offset = offsets[file];
                offsets[file] = offset.wrapping_add(m.len() as u64 + 1);
                // Times go back now and then (clock steps; two files of one stream).
                let ns = base + (m.len() as u128 * 7_919 + i as u128 * 1_000_003) % 5_000_000_000;
                let ts = Timestamp::at(UNIX_EPOCH + Duration::from_nanos(ns as u64));
                In {
                    file,
                    message: m.to_string(),
                    offset,
                    ts,
                }
            })
            .collect();
        Input {
            files,
            events,
            template,
            variant: flags >> 4,
        }
    }

    /// The events encoded by `encoder` into one batch, as the readers build it.
    pub fn batch(&self, encoder: Box<dyn Encoder>) -> Batch {
        let mut b = BatchBuilder::new(
            BatchLimits {
                max_bytes: 1 << 16,
                max_events: 1 << 10,
                linger: Duration::from_secs(1),
            },
            encoder,
        );
        for e in &self.events {
            let end = e.offset.wrapping_add(e.message.len() as u64 + 1);
            b.push(&self.files[e.file], e.message.as_bytes(), e.offset, end, &e.ts);
        }
        b.take()
            .unwrap_or_else(|| panic!("no batch for {} events", self.events.len()))
    }

    /// `{fingerprint:016x}-{offset:x}`, written independently of voltail's two renderings.
    pub fn id(&self, e: &In) -> String {
        format!("{:016x}-{:x}", self.files[e.file].fingerprint, e.offset)
    }
}

/// The lines of an NDJSON payload, without their `\n`; the payload must end with one.
pub fn lines(payload: &[u8]) -> Vec<&[u8]> {
    match payload.strip_suffix(b"\n") {
        Some(p) => p.split(|&b| b == b'\n').collect(),
        None => {
            assert!(
                payload.is_empty(),
                "the payload does not end with a newline"
            );
            Vec::new()
        }
    }
}

/// Parses one JSON line, naming the line when it isn't JSON.
pub fn json(line: &[u8]) -> serde_json::Value {
    serde_json::from_slice(line)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(line)))
}

/// A template rendered by a reference reading of its docs (`{tag}` and `{source}` replaced,
/// `unknown` for a missing tag); `None` for a template the docs say is refused (an unclosed `{`,
/// a `}` without its `{`, an empty or non-`[A-Za-z0-9_-]` name).
pub fn render_model(template: &str, meta: &FileMeta) -> Option<String> {
    let mut out = String::new();
    let mut rest = template;
    loop {
        let open = rest.find('{');
        let close = rest.find('}');
        match (open, close) {
            (None, None) => {
                out.push_str(rest);
                return Some(out);
            }
            (Some(o), Some(c)) if o < c => {
                out.push_str(&rest[..o]);
                let name = &rest[o + 1..c];
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    return None;
                }
                if name == "source" {
                    out.push_str(&meta.source);
                } else {
                    let v = meta.tags.iter().find(|(k, _)| k == name);
                    out.push_str(v.map_or("unknown", |(_, v)| v.as_str()));
                }
                rest = &rest[c + 1..];
            }
            _ => return None,
        }
    }
}
