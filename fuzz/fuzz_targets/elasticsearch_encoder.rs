//! The `elasticsearch` sink's encoder (`BulkEncoder`): a batch of any events is a `_bulk` body
//! of two lines per event, the action (`create` or `index`, per the config) with `_index` =
//! the index template rendered for the event's file and lowercased, and `_id` = the event id,
//! then the document: the NDJSON object with `@timestamp` for `timestamp`, the same message,
//! file, source, offset and tags. Each event's slice of the payload (`Batch::event_bytes`, what
//! a partial retry re-sends) is exactly its two lines. The config is built from TOML as the
//! sink's unit tests do; an index the config refuses falls back to the default.
#![no_main]

#[path = "sink_input.rs"]
mod sink_input;

use libfuzzer_sys::fuzz_target;
use sink_input::{json, lines, render_model, Input};
use voltail::sink::elasticsearch::{BulkEncoder, ElasticsearchSinkConfig};

fn config(index: &str, action: &str) -> ElasticsearchSinkConfig {
    let index = toml::Value::String(index.to_string());
    toml::from_str(&format!(
        "endpoint = \"http://es:9200\"\nindex = {index}\naction = \"{action}\""
    ))
    .expect("the config parses")
}

fuzz_target!(|data: &[u8]| {
    let input = Input::parse(data);
    let action = if input.variant & 1 == 0 {
        "create"
    } else {
        "index"
    };
    let mut cfg = config(&input.template, action);
    if cfg.validate().is_err() {
        cfg = config("voltail-{source}", action);
        cfg.validate().expect("the default config is valid");
    }
    let batch = input.batch(Box::new(BulkEncoder::new(&cfg)));
    let lines = lines(&batch.payload);
    assert_eq!(lines.len(), 2 * input.events.len(), "two lines per event");
    for (i, e) in input.events.iter().enumerate() {
        let meta = &input.files[e.file];
        let (a, d) = (lines[2 * i], lines[2 * i + 1]);
        let mut item = a.to_vec();
        item.push(b'\n');
        item.extend_from_slice(d);
        item.push(b'\n');
        assert_eq!(batch.event_bytes(i), item, "event {i}'s slice");
        let a = json(a);
        let index = render_model(&cfg.index, meta)
            .unwrap_or_else(|| panic!("index {:?} validates but is not a template", cfg.index))
            .to_lowercase();
        let expected = serde_json::json!({ action: { "_index": index, "_id": input.id(e) } });
        assert_eq!(a, expected);
        let d = json(d);
        assert_eq!(d["@timestamp"].as_str(), Some(e.ts.rfc3339()));
        assert_eq!(d["message"].as_str(), Some(e.message.as_str()));
        assert_eq!(d["file"].as_str(), Some(meta.path.as_str()));
        assert_eq!(d["source"].as_str(), Some(&*meta.source));
        assert_eq!(d["offset"].as_u64(), Some(e.offset));
        let tags: serde_json::Map<String, serde_json::Value> = meta
            .tags
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().into()))
            .collect();
        assert_eq!(d["tags"], serde_json::Value::Object(tags));
        assert_eq!(d.as_object().map(|o| o.len()), Some(6), "fields: {d}");
    }
});
