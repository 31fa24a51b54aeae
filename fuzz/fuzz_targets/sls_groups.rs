//! The `sls` sink's encoder (`SlsEncoder`) and the `LogGroup`s the sink builds from a batch of
//! it (`SlsSink::groups`), each encoded with prost and lz4-compressed as `put` does, then
//! decoded (lz4 with the raw size of `x-log-bodyrawsize`, then prost with the crate's own
//! `proto` types): every group holds the events of one file, in order, each as one `Log` with
//! the message under `content` and the collection time in `time` + `time_ns`; the group's
//! `LogTags` are `__path__` and the file's tags, each name once (a tag named `__path__` as
//! `__path___extracted`); its topic is the topic template
//! rendered for the file (the config is built from TOML as in the sink's docs; a topic the
//! config refuses falls back to none) and its source the configured one.
#![no_main]

#[path = "sink_input.rs"]
mod sink_input;

use std::cell::RefCell;
use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use sink_input::{render_model, Input};
use voltail::sink::sls::{proto, SlsEncoder, SlsSink, SlsSinkConfig};

fn config(topic: &str) -> SlsSinkConfig {
    let topic = toml::Value::String(topic.to_string());
    toml::from_str(&format!(
        "endpoint = \"https://cn-hangzhou.log.aliyuncs.com\"\nproject = \"p\"\n\
         logstore = \"ls\"\naccess_key_id = \"id\"\naccess_key_secret = \"secret\"\n\
         source = \"host-1\"\ntopic = {topic}\n"
    ))
    .expect("the config parses")
}

thread_local! {
    /// One sink per topic template: building its HTTP client is the slow part.
    static SINKS: RefCell<HashMap<String, SlsSink>> = RefCell::new(HashMap::new());
}

fuzz_target!(|data: &[u8]| {
    let input = Input::parse(data);
    let mut cfg = config(&input.template);
    if cfg.validate().is_err() {
        cfg = config("");
    }
    let batch = input.batch(Box::new(SlsEncoder));
    let groups = SINKS.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() > 64 {
            s.clear();
        }
        let sink = s
            .entry(cfg.topic.clone())
            .or_insert_with(|| SlsSink::new(&cfg).expect("the sink builds"));
        sink.groups(&batch).expect("a batch of SlsEncoder events")
    });
    // The wire form, decoded with the crate's own types.
    let groups: Vec<proto::LogGroup> = groups
        .iter()
        .map(|g| {
            let raw = g.encode_to_vec();
            let body = lz4_flex::block::compress(&raw);
            let raw = lz4_flex::block::decompress(&body, raw.len()).expect("lz4 decompresses");
            proto::LogGroup::decode(raw.as_slice()).expect("the group decodes")
        })
        .collect();
    // Each file's logs, in group order.
    let mut logs: Vec<Vec<&proto::Log>> = vec![Vec::new(); input.files.len()];
    for g in &groups {
        let tags: Vec<(&str, &str)> = g
            .log_tags
            .iter()
            .map(|t| (t.key.as_str(), t.value.as_str()))
            .collect();
        let f = input
            .files
            .iter()
            .position(|m| tags.first() == Some(&("__path__", m.path.as_str())))
            .unwrap_or_else(|| panic!("a group of no file: {tags:?}"));
        let m = &input.files[f];
        let mut want = vec![("__path__", m.path.as_str())];
        // A tag named `__path__` goes as `__path___extracted`.
        let renamed: Vec<(String, &str)> = m
            .tags
            .iter()
            .map(|(k, v)| match k.as_str() {
                "__path__" => ("__path___extracted".to_string(), v.as_str()),
                _ => (k.clone(), v.as_str()),
            })
            .collect();
        want.extend(renamed.iter().map(|(k, v)| (k.as_str(), *v)));
        assert_eq!(tags, want);
        let mut keys: Vec<&str> = tags.iter().map(|t| t.0).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), tags.len(), "duplicate log tags {tags:?}");
        let topic = render_model(&cfg.topic, m).expect("a valid topic renders");
        assert_eq!(g.topic.as_deref(), Some(topic.as_str()));
        assert_eq!(g.source.as_deref(), Some("host-1"));
        assert!(!g.logs.is_empty(), "an empty group");
        logs[f].extend(&g.logs);
    }
    let mut next = vec![0usize; input.files.len()];
    for e in &input.events {
        let log = logs[e.file]
            .get(next[e.file])
            .unwrap_or_else(|| panic!("file {} is short of logs", e.file));
        next[e.file] += 1;
        let ns = e.ts.unix_nanos;
        assert_eq!(u128::from(log.time), ns / 1_000_000_000);
        assert_eq!(log.time_ns.map(u128::from), Some(ns % 1_000_000_000));
        assert_eq!(log.contents.len(), 1);
        assert_eq!(log.contents[0].key, "content");
        assert_eq!(log.contents[0].value, e.message);
    }
    for (f, l) in logs.iter().enumerate() {
        assert_eq!(next[f], l.len(), "file {f} has extra logs");
    }
});
