//! Sink tests against servers that decode the real wire formats (and a real ClickHouse, and
//! librdkafka's mock cluster): every field checked, failures injected.

mod clickhouse;
mod e2e;
mod elasticsearch;
mod http;
#[cfg(feature = "kafka")]
mod kafka;
mod loki;
pub mod server;
mod sls;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use voltail::batch::{Batch, BatchBuilder, BatchLimits, Compressor, FileMeta, Timestamp};
use voltail::config::{Config, SinkConfig};
use voltail::sink::Sink;

/// A config whose `[sink]` table is `sink` (the body after `[sink]`).
pub fn config(sink: &str) -> Config {
    let text = format!(
        "data_dir = \"/tmp/voltail-sink-tests\"\n[[sources]]\nname = \"app\"\ninclude = [\"/var/log/*.log\"]\n[sink]\n{sink}\n"
    );
    Config::parse(Path::new("test.toml"), &text).unwrap_or_else(|e| panic!("config: {e}"))
}

/// The sink `cfg` describes, recovered with no cursor.
pub fn sink(cfg: &Config) -> Box<dyn Sink> {
    let mut s = voltail::sink::build(cfg).unwrap_or_else(|e| panic!("build sink: {e}"));
    s.recover(None).expect("recover");
    s
}

/// A file with tags.
pub fn file(key: u64, path: &str, tags: &[(&str, &str)], fingerprint: u64) -> Arc<FileMeta> {
    Arc::new(FileMeta::new(
        key,
        Arc::from("app"),
        path.to_string(),
        tags.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        fingerprint,
    ))
}

/// A batch of `events` (file, message, offset) encoded and compressed as the pipeline would for
/// `cfg`'s sink.
pub fn batch(cfg: &SinkConfig, events: &[(&Arc<FileMeta>, &str, u64)], ts: &Timestamp) -> Batch {
    let mut b = BatchBuilder::new(
        BatchLimits {
            max_bytes: 64 << 20,
            max_events: 1 << 20,
            linger: Duration::ZERO,
        },
        voltail::sink::encoder(cfg),
    );
    if events.is_empty() {
        // What the pipeline sends when only offsets move (e.g. skipped bytes): no events.
        b.ack(1, 0);
    }
    for (m, msg, off) in events {
        b.push(m, msg.as_bytes(), *off, ts);
        b.ack(m.key, off + msg.len() as u64 + 1);
    }
    let mut batch = b.take().expect("a batch");
    let (kind, level) = cfg.compression();
    Compressor::new(kind, level)
        .compress(&mut batch)
        .expect("compress");
    batch
}

/// `n` lines of varied content, with characters JSON and protobuf must carry intact.
pub fn lines(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i % 4 {
            0 => format!("line {i} plain"),
            1 => format!("line {i} \"quoted\" \\ back\tslash ünïcødé 日本"),
            2 => format!("line {i} {{\"json\":true,\"n\":{i}}}"),
            _ => format!("line {i} control \u{1} end"),
        })
        .collect()
}
