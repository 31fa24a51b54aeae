//! The NDJSON encoder: for any message, path and tags (valid UTF-8, as the reader hands them
//! over), the output is one line of JSON holding the same message, path, offset and tags.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use voltail::batch::{Encoder, Event, FileMeta, NdjsonEncoder, Timestamp};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Fields separated by \u{1}: message, path, source, tag key, tag value.
    let mut parts = text.split('\u{1}');
    let message = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or("/p").to_string();
    let source = parts.next().unwrap_or("s");
    let tags: Vec<(String, String)> = match (parts.next(), parts.next()) {
        (Some(k), Some(v)) => vec![(k.to_string(), v.to_string()), ("z".into(), v.to_string())],
        _ => Vec::new(),
    };
    let offset = data.len() as u64 * 7919;
    let meta = FileMeta::new(3, Arc::from(source), path.clone(), tags.clone(), 42);
    let ts = Timestamp::now();
    let mut out = Vec::new();
    NdjsonEncoder.encode(
        &Event {
            message: message.as_bytes(),
            offset,
            meta: &meta,
            timestamp: &ts,
        },
        &mut out,
    );
    assert_eq!(out.last(), Some(&b'\n'));
    assert_eq!(
        memchr_count(&out),
        1,
        "one line: {}",
        String::from_utf8_lossy(&out)
    );
    let v: serde_json::Value = serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out)));
    assert_eq!(v["message"].as_str(), Some(message));
    assert_eq!(v["file"].as_str(), Some(path.as_str()));
    assert_eq!(v["source"].as_str(), Some(source));
    assert_eq!(v["offset"].as_u64(), Some(offset));
    assert_eq!(v["timestamp"].as_str(), Some(ts.rfc3339()));
    for (k, val) in &tags {
        assert_eq!(
            v["tags"][k.as_str()].as_str(),
            Some(val.as_str()),
            "tag {k:?}"
        );
    }
});

fn memchr_count(b: &[u8]) -> usize {
    b.iter().filter(|&&c| c == b'\n').count()
}
