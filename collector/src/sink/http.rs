//! The `http` sink: each batch is one `POST` of NDJSON to a URL.
//!
//! Events are the lead's NDJSON objects plus `"id"`, the event's stable id (file fingerprint +
//! offset), so a receiver can deduplicate what a retry or a restart sends again. The body is
//! compressed with zstd by the batch stage (`Content-Encoding: zstd`), or with gzip here
//! (`Content-Encoding: gzip`, for receivers that can't read zstd), or not at all.
//! Any 2xx acknowledges the batch; see [`super::client`] for how other answers are classified.
//!
//! The sink does not retry or batch on its own: one `send` is one request.
//!
//! ```toml
//! [sink]
//! type = "http"
//! url = "https://ingest.example.com/v1/logs"
//! compression = "zstd"            # or "gzip", "none"
//! headers = { X-Api-Key = "${INGEST_KEY}" }
//! auth = { type = "bearer", token_file = "/var/run/secrets/ingest/token" }
//! ca_file = "/etc/voltail/ca.pem"
//! timeout = "30s"
//! concurrency = 4                 # batches in flight (one request each); acked in order
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::client::{self, Auth, ClientOptions, HttpClient, Secret};
use super::{Sink, SinkError};
use crate::batch::{Batch, Encoder, Event, NdjsonEncoder};
use crate::config::{Compression, Dur};

/// `[sink] type = "http"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// Where batches are POSTed (`http://` or `https://`).
    pub url: String,
    /// `zstd` (default), `gzip` or `none`.
    #[serde(default = "defaults::compression")]
    pub compression: Compression,
    /// zstd level (-7..=22) or gzip level (0..=9).
    #[serde(default = "defaults::compression_level")]
    pub compression_level: i32,
    /// Extra headers (values are treated as secrets: API keys often live here).
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// Authentication.
    #[serde(default)]
    pub auth: Option<Auth>,
    /// PEM file of CA certificates to trust (instead of the built-in web roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Whole-request timeout.
    #[serde(default = "defaults::timeout")]
    pub timeout: Dur,
    /// Batches sent at once (each one request); acknowledged to the checkpoint in order.
    #[serde(default = "super::default_concurrency")]
    pub concurrency: usize,
}

pub(crate) mod defaults {
    use super::*;
    pub fn compression() -> Compression {
        Compression::Zstd
    }
    pub fn compression_level() -> i32 {
        1
    }
    pub fn timeout() -> Dur {
        Dur(Duration::from_secs(30))
    }
}

impl HttpSinkConfig {
    /// The compression the batch stage applies (gzip is done here, in the sink).
    pub fn stage_compression(&self) -> (Compression, i32) {
        match self.compression {
            Compression::Zstd => (Compression::Zstd, self.compression_level),
            _ => (Compression::None, 0),
        }
    }

    /// Checks what serde can't; errors are `(key, message)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        validate_url("url", &self.url)?;
        validate_level(self.compression, self.compression_level)?;
        validate_common(self.auth.as_ref(), self.timeout)?;
        for (k, v) in &self.headers {
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                return Err(("headers", format!("{k:?} is not a header name")));
            }
            if v.0.bytes().any(|b| b == b'\r' || b == b'\n') {
                return Err(("headers", format!("the value of {k:?} has a line break")));
            }
        }
        Ok(())
    }

    fn client_options(&self) -> ClientOptions {
        ClientOptions {
            timeout: self.timeout.0,
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            auth: self.auth.clone(),
            ca_file: self.ca_file.clone(),
        }
    }
}

/// Checks that `url` is an absolute http(s) URL.
pub(crate) fn validate_url(key: &'static str, url: &str) -> Result<(), (&'static str, String)> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') => Ok(()),
        _ => Err((key, format!("{url:?} is not an http:// or https:// URL"))),
    }
}

/// Checks a compression level for its codec.
pub(crate) fn validate_level(c: Compression, level: i32) -> Result<(), (&'static str, String)> {
    let ok = match c {
        Compression::Zstd => (-7..=22).contains(&level),
        Compression::Gzip => (0..=9).contains(&level),
        Compression::None => true,
    };
    if ok {
        Ok(())
    } else {
        Err((
            "compression_level",
            "zstd levels are -7..=22, gzip levels 0..=9".into(),
        ))
    }
}

/// Checks auth and timeout.
pub(crate) fn validate_common(
    auth: Option<&Auth>,
    timeout: Dur,
) -> Result<(), (&'static str, String)> {
    if let Some(p) = auth.and_then(|a| a.problem()) {
        return Err(("auth", p.into()));
    }
    if timeout.0.is_zero() {
        return Err(("timeout", "must be above zero".into()));
    }
    Ok(())
}

/// Appends `meta.event_id(offset)` (`{fingerprint:016x}-{offset:x}`) to `out` without
/// allocating: it is written for every event.
pub fn push_event_id(fingerprint: u64, offset: u64, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in (0..16).rev() {
        out.push(HEX[((fingerprint >> (i * 4)) & 15) as usize]);
    }
    out.push(b'-');
    let digits = if offset == 0 {
        1
    } else {
        (64 - offset.leading_zeros()).div_ceil(4)
    };
    for i in (0..digits).rev() {
        out.push(HEX[((offset >> (i * 4)) & 15) as usize]);
    }
}

/// The lead's NDJSON object with `"id"` added as its last field.
#[derive(Debug, Default, Clone, Copy)]
pub struct NdjsonWithIdEncoder;

impl Encoder for NdjsonWithIdEncoder {
    fn encode(&mut self, ev: &Event<'_>, out: &mut Vec<u8>) {
        NdjsonEncoder.encode(ev, out);
        // NdjsonEncoder ends every object with `}\n`: reopen it to append the id.
        debug_assert!(out.ends_with(b"}\n"));
        out.truncate(out.len() - 2);
        out.extend_from_slice(b",\"id\":\"");
        push_event_id(ev.meta.fingerprint, ev.offset, out);
        out.extend_from_slice(b"\"}\n");
    }
}

/// POSTs batches as NDJSON.
#[derive(Debug)]
pub struct HttpSink {
    url: String,
    compression: Compression,
    level: i32,
    client: HttpClient,
}

impl HttpSink {
    /// Builds the client (reads the CA file and credentials).
    pub fn new(cfg: &HttpSinkConfig) -> Result<HttpSink, SinkError> {
        Ok(HttpSink {
            url: cfg.url.clone(),
            compression: cfg.compression,
            level: cfg.compression_level,
            client: HttpClient::new("http", &cfg.client_options())?,
        })
    }
}

impl Sink for HttpSink {
    fn name(&self) -> &'static str {
        "http"
    }

    fn send(&mut self, batch: &Batch) -> Result<(), SinkError> {
        if batch.events.is_empty() {
            return Ok(());
        }
        let (body, encoding) = client::body(batch, self.compression, self.level);
        let mut headers = vec![("Content-Type", "application/x-ndjson")];
        if let Some(e) = encoding {
            headers.push(("Content-Encoding", e));
        }
        self.client
            .post(&self.url, &headers, &body, batch.raw_bytes)
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{FileMeta, Timestamp};
    use std::sync::Arc;

    #[test]
    fn id_is_appended_and_json_stays_valid() {
        let m = FileMeta::new(
            1,
            Arc::from("s"),
            "/f".into(),
            vec![("a".into(), "b".into())],
            0xab,
        );
        let ts = Timestamp::now();
        let mut out = Vec::new();
        NdjsonWithIdEncoder.encode(
            &Event {
                message: b"hi \"x\"",
                offset: 255,
                meta: &m,
                timestamp: &ts,
            },
            &mut out,
        );
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["id"], "00000000000000ab-ff");
        assert_eq!(v["message"], "hi \"x\"");
        assert_eq!(v["tags"]["a"], "b");
        assert!(out.ends_with(b"}\n"));
    }

    #[test]
    fn event_ids_match_file_meta() {
        for fp in [0, 1, 0xabc, u64::MAX] {
            let m = FileMeta::new(1, Arc::from("s"), "/f".into(), vec![], fp);
            for off in [0, 1, 15, 16, 255, 4096, u64::MAX >> 3, u64::MAX] {
                let mut out = Vec::new();
                push_event_id(fp, off, &mut out);
                assert_eq!(String::from_utf8(out).expect("ascii"), m.event_id(off));
            }
        }
    }

    #[test]
    fn config_checks() {
        let mut c: HttpSinkConfig =
            toml::from_str("url = \"http://127.0.0.1:1/x\"").expect("minimal config");
        assert!(c.validate().is_ok());
        assert_eq!(c.stage_compression(), (Compression::Zstd, 1));
        c.compression = Compression::Gzip;
        c.compression_level = 12;
        assert_eq!(c.validate().expect_err("level").0, "compression_level");
        c.compression_level = 6;
        assert_eq!(c.stage_compression().0, Compression::None);
        c.url = "ftp://x".into();
        assert_eq!(c.validate().expect_err("url").0, "url");
    }
}
