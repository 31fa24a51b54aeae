//! Sink tests against servers that decode the real wire formats (and a real ClickHouse, and
//! librdkafka's mock cluster): every field checked, failures injected.

mod clickhouse;
mod concurrency;
mod e2e;
mod elasticsearch;
mod http;
#[cfg(feature = "kafka")]
mod kafka;
mod loki;
pub mod server;
mod sls;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use voltail::batch::{Batch, BatchBuilder, BatchLimits, Compressor, FileMeta, Timestamp};
use voltail::config::{Config, SinkConfig};
use voltail::sink::Sink;

/// `n` pod files, `<pods>/ns1_pod-<i>_uid<i>/app/0.log`, their directories created.
pub fn pod_files(pods: &Path, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let d = pods.join(format!("ns1_pod-{i}_uid{i}/app"));
            std::fs::create_dir_all(&d).expect("mkdir");
            d.join("0.log")
        })
        .collect()
}

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
        let end = off + msg.len() as u64 + 1;
        b.push(m, msg.as_bytes(), *off, end, ts);
        b.ack(m.key, end);
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

/// A private CA, and a server certificate for `name` (a DNS name, or an IP address) signed by
/// it: `(ca_pem, server_config)`.
pub fn tls_pair(name: &str) -> (String, Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "voltail test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key_der)
    .expect("server config");
    (ca_cert.pem(), Arc::new(cfg))
}
