//! The `clickhouse` sink's encoder (`JsonEachRowEncoder`): a batch of any events is one
//! `JSONEachRow` line per event, each valid JSON with the columns of `TABLE_SCHEMA` holding the
//! same values (time in seconds and nanoseconds, id, source, file, offset, message, and the
//! tags as `tags.key`/`tags.value` in order), also when the events of two files interleave
//! (the encoder keeps the last file's rendered parts).
#![no_main]

#[path = "sink_input.rs"]
mod sink_input;

use libfuzzer_sys::fuzz_target;
use sink_input::{json, lines, Input};
use voltail::sink::clickhouse::JsonEachRowEncoder;

fuzz_target!(|data: &[u8]| {
    let input = Input::parse(data);
    let batch = input.batch(Box::new(JsonEachRowEncoder::default()));
    let lines = lines(&batch.payload);
    assert_eq!(lines.len(), input.events.len(), "one row per event");
    for (e, line) in input.events.iter().zip(&lines) {
        let meta = &input.files[e.file];
        let v = json(line);
        let ns = e.ts.unix_nanos;
        assert_eq!(v["timestamp"].as_u64(), Some((ns / 1_000_000_000) as u64));
        assert_eq!(v["timestamp_ns"].as_u64(), Some(ns as u64));
        assert_eq!(v["id"].as_str(), Some(input.id(e).as_str()));
        assert_eq!(v["source"].as_str(), Some(&*meta.source));
        assert_eq!(v["file"].as_str(), Some(meta.path.as_str()));
        assert_eq!(v["offset"].as_u64(), Some(e.offset));
        assert_eq!(v["message"].as_str(), Some(e.message.as_str()));
        let keys: Vec<&str> = meta.tags.iter().map(|(k, _)| k.as_str()).collect();
        let values: Vec<&str> = meta.tags.iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(v["tags.key"], serde_json::json!(keys));
        assert_eq!(v["tags.value"], serde_json::json!(values));
        assert_eq!(v.as_object().map(|o| o.len()), Some(9), "columns: {v}");
    }
});
