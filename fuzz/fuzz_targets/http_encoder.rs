//! The `http` sink's encoder (`NdjsonWithIdEncoder`), also the `kafka` sink's: a batch of any
//! events is one line per event, each valid JSON with the same message, file, source, offset,
//! timestamp, tags and `id` (fingerprint + offset). The kafka sink's record parts come out
//! right too: each event's slice of the payload (`Batch::event_bytes`, the message value) is
//! its line, `FileMeta::event_id` (the `voltail-id` header) is the same id, and the topic and
//! key templates render as their docs say (or are refused when the docs say so).
#![no_main]

#[path = "sink_input.rs"]
mod sink_input;

use libfuzzer_sys::fuzz_target;
use sink_input::{json, lines, render_model, Input};
use voltail::sink::client::Template;
use voltail::sink::http::NdjsonWithIdEncoder;

fuzz_target!(|data: &[u8]| {
    let input = Input::parse(data);
    let batch = input.batch(Box::new(NdjsonWithIdEncoder));
    let lines = lines(&batch.payload);
    assert_eq!(lines.len(), input.events.len(), "one line per event");
    for (i, (e, line)) in input.events.iter().zip(&lines).enumerate() {
        let meta = &input.files[e.file];
        let value = batch.event_bytes(i);
        assert_eq!(value.strip_suffix(b"\n"), Some(*line), "event {i}'s slice");
        let v = json(line);
        assert_eq!(v["message"].as_str(), Some(e.message.as_str()));
        assert_eq!(v["file"].as_str(), Some(meta.path.as_str()));
        assert_eq!(v["source"].as_str(), Some(&*meta.source));
        assert_eq!(v["offset"].as_u64(), Some(e.offset));
        assert_eq!(v["timestamp"].as_str(), Some(e.ts.rfc3339()));
        let id = input.id(e);
        assert_eq!(v["id"].as_str(), Some(id.as_str()));
        assert_eq!(meta.event_id(e.offset), id);
        let tags: serde_json::Map<String, serde_json::Value> = meta
            .tags
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().into()))
            .collect();
        assert_eq!(v["tags"], serde_json::Value::Object(tags));
        assert_eq!(v.as_object().map(|o| o.len()), Some(7), "fields: {v}");
    }
    // Topic and key: `Template::parse` + `render` against the documented reading.
    let parsed = Template::parse(&input.template);
    for meta in &input.files {
        let model = render_model(&input.template, meta);
        assert_eq!(
            parsed.as_ref().ok().map(|t| t.render(meta)),
            model,
            "template {:?}: {:?}",
            input.template,
            parsed.as_ref().err()
        );
    }
});
