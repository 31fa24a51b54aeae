//! The `loki` sink's encoder (`LokiEncoder`) and the push request the sink builds from a batch
//! of it (`LokiSink::request`), encoded with prost and snappy as `send` does, then decoded
//! (snappy, then prost with the crate's own `proto` types): each file's events are in the
//! stream whose labels, parsed back from Loki's `{name="value", ...}` form, are the static
//! labels plus the allow-listed ones (`source` = the source name) of that file, in batch
//! order, with the same line (or, with `extra = "json"`, a JSON object of the message, the
//! file and the other tags), the same structured metadata (the file and the other tags),
//! and timestamps that are the collection times except that they never go back within a
//! stream. No tag is lost and no name is in an entry twice: a tag named `source` is never a
//! label, one named like the entry's own fields (`file`, and `message` in a JSON line) goes
//! as `<name>_extracted`. The returned last timestamps are each stream's last entry's.
//!
//! Variant bits: 0 = `extra = "json"`, 1 = labels `["ns"]` instead of `["source", "ns"]`,
//! 2 = a static label `cluster`.
#![no_main]

#[path = "sink_input.rs"]
mod sink_input;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use sink_input::Input;
use voltail::batch::FileMeta;
use voltail::sink::loki::{proto, LokiEncoder, LokiExtra, LokiSink, LokiSinkConfig};

fn config(variant: u8) -> LokiSinkConfig {
    let mut t = String::from("endpoint = \"http://loki:3100\"\n");
    t.push_str(if variant & 1 == 1 {
        "extra = \"json\"\n"
    } else {
        "extra = \"metadata\"\n"
    });
    t.push_str(if variant & 2 == 2 {
        "labels = [\"ns\"]\n"
    } else {
        "labels = [\"source\", \"ns\"]\n"
    });
    if variant & 4 == 4 {
        t.push_str("static_labels = { cluster = \"c-1\" }\n");
    }
    let c: LokiSinkConfig = toml::from_str(&t).expect("the config parses");
    c.validate().expect("the config is valid");
    c
}

thread_local! {
    /// One sink per variant: building its HTTP client is the slow part.
    static SINKS: RefCell<HashMap<u8, LokiSink>> = RefCell::new(HashMap::new());
}

/// Parses `{a="x", b="y"}` as Loki (Prometheus' parser, Go unquoting) does; `None` if it can't.
fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut rest = s.strip_prefix('{')?;
    let mut out = Vec::new();
    if let Some(r) = rest.strip_prefix('}') {
        return r.is_empty().then_some(out);
    }
    loop {
        let eq = rest.find('=')?;
        let name = &rest[..eq];
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        let mut it = rest[eq + 1..].strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match it.next()? {
                (i, '"') => break i,
                (_, '\n') => return None,
                (_, '\\') => value.push(match it.next()?.1 {
                    '\\' => '\\',
                    '"' => '"',
                    'n' => '\n',
                    't' => '\t',
                    'r' => '\r',
                    _ => return None,
                }),
                (_, c) => value.push(c),
            }
        };
        out.push((name.to_string(), value));
        rest = &rest[eq + 1..][1 + end + 1..];
        if let Some(r) = rest.strip_prefix(", ") {
            rest = r;
        } else {
            return (rest == "}").then_some(out);
        }
    }
}

/// A JSON object's members in order, duplicates kept.
fn json_members(line: &str) -> Vec<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("json line is not JSON ({e}): {line:?}"));
    let n = v.as_object().map_or(0, |o| o.len());
    let mut de = serde_json::Deserializer::from_str(line);
    let members: Vec<(String, String)> =
        serde::Deserialize::deserialize(&mut de).map_or_else(|_| Vec::new(), |m: Pairs| m.0);
    assert_eq!(members.len(), n, "duplicate names in {line:?}");
    members
}

struct Pairs(Vec<(String, String)>);

impl<'de> serde::Deserialize<'de> for Pairs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Pairs, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Pairs;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Pairs, A::Error> {
                let mut v = Vec::new();
                while let Some(kv) = m.next_entry::<String, String>()? {
                    v.push(kv);
                }
                Ok(Pairs(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// The labels of `m`'s stream, sorted by name.
fn expected_labels(cfg: &LokiSinkConfig, m: &FileMeta) -> Vec<(String, String)> {
    let mut l: BTreeMap<String, String> = cfg.static_labels.clone();
    for name in &cfg.labels {
        let v = if name == "source" {
            Some(m.source.to_string())
        } else {
            m.tags
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        if let Some(v) = v {
            l.insert(name.clone(), v);
        }
    }
    l.into_iter().collect()
}

/// The file and the tags that are not labels, as metadata or JSON members (after the
/// `message` member of a JSON line). A tag named `source` is never a label (that label is the
/// source name), so it is one of these; a tag named like a field of the entry (`own`) takes
/// the suffix `_extracted`.
fn expected_extra(cfg: &LokiSinkConfig, m: &FileMeta, own: &[&str]) -> Vec<(String, String)> {
    let mut v = vec![("file".to_string(), m.path.clone())];
    v.extend(
        m.tags
            .iter()
            .filter(|(k, _)| k == "source" || !cfg.labels.contains(k))
            .map(|(k, val)| {
                let name = if own.contains(&k.as_str()) {
                    format!("{k}_extracted")
                } else {
                    k.clone()
                };
                (name, val.clone())
            }),
    );
    v
}

fuzz_target!(|data: &[u8]| {
    let input = Input::parse(data);
    let variant = input.variant & 7;
    let cfg = config(variant);
    let batch = input.batch(Box::new(LokiEncoder));
    let (req, last) = SINKS.with(|s| {
        let mut s = s.borrow_mut();
        let sink = s
            .entry(variant)
            .or_insert_with(|| LokiSink::new(&cfg).expect("the sink builds"));
        sink.request(&batch).expect("a batch of LokiEncoder events")
    });
    // The wire form, decoded with the crate's own types.
    let body = snap::raw::Encoder::new()
        .compress_vec(&req.encode_to_vec())
        .expect("snappy compresses");
    let raw = snap::raw::Decoder::new()
        .decompress_vec(&body)
        .expect("snappy decompresses");
    let req = proto::PushRequest::decode(raw.as_slice()).expect("the request decodes");
    assert_eq!(last.len(), req.streams.len());
    // Which stream each file's entries are in, by their labels.
    let mut stream_of: Vec<usize> = Vec::new();
    for (f, m) in input.files.iter().enumerate() {
        if !input.events.iter().any(|e| e.file == f) {
            // Not in the batch.
            stream_of.push(usize::MAX);
            continue;
        }
        let want = expected_labels(&cfg, m);
        let found: Vec<usize> = (0..req.streams.len())
            .filter(|&s| parse_labels(&req.streams[s].labels).as_ref() == Some(&want))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one stream of labels {want:?}: {:?}",
            req.streams
        );
        stream_of.push(found[0]);
    }
    let mut next = vec![0usize; req.streams.len()];
    let mut prev = vec![0u128; req.streams.len()];
    for e in &input.events {
        let m = &input.files[e.file];
        let s = stream_of[e.file];
        let entry = req.streams[s]
            .entries
            .get(next[s])
            .unwrap_or_else(|| panic!("stream {s} is short of entries"));
        next[s] += 1;
        let json = cfg.extra == LokiExtra::Json;
        let own: &[&str] = if json {
            &["message", "file"]
        } else {
            &["file"]
        };
        let extra = expected_extra(&cfg, m, own);
        let names: Vec<&str> = extra.iter().map(|(k, _)| k.as_str()).collect();
        let metadata: Vec<(String, String)> = entry
            .structured_metadata
            .iter()
            .map(|p| (p.name.clone(), p.value.clone()))
            .collect();
        if json {
            let mut want = vec![("message".to_string(), e.message.clone())];
            want.extend(extra);
            assert_eq!(json_members(&entry.line), want);
            assert!(metadata.is_empty());
        } else {
            assert_eq!(entry.line, e.message);
            assert_eq!(metadata, extra);
            let mut sorted = names.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(
                sorted.len(),
                names.len(),
                "duplicate metadata names {names:?}"
            );
        }
        let ts = entry.timestamp.as_ref().expect("a timestamp");
        assert!((0..1_000_000_000).contains(&ts.nanos));
        let ns = ts.seconds as u128 * 1_000_000_000 + ts.nanos as u128;
        assert_eq!(ns, e.ts.unix_nanos.max(prev[s]), "entry time");
        prev[s] = ns;
    }
    for (s, stream) in req.streams.iter().enumerate() {
        assert_eq!(
            next[s],
            stream.entries.len(),
            "stream {s} has extra entries"
        );
        assert_eq!(last[s], prev[s], "last timestamp of stream {s}");
    }
});
