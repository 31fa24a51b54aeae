//! The `sls` sink: Alibaba Cloud Log Service `PutLogs`, the backend of the original Logtail.
//!
//! Each file's events become a protobuf `LogGroup` (`POST /logstores/<logstore>/shards/lb` on
//! `<project>.<endpoint>`): one `Log` per event with the line under `content` and the collection
//! time (`Time` + `Time_ns`); the path tags and `__path__` as `LogTags` (a tag named
//! `__path__` as `__path___extracted`); the topic rendered from the path tags
//! (`topic = "{app}"`); `Source` the collector's host name. Bodies are lz4 (raw block, SLS's
//! default) or zstd, and every request is signed as the SLS API describes (HMAC-SHA1 over the
//! verb, `Content-MD5`, `Content-Type`, `Date`, the sorted `x-log-`/`x-acs-` headers and the
//! resource).
//!
//! A batch holding several files takes several requests; when one fails after others
//! succeeded, only the groups not yet accepted are sent when the uploader retries the batch.
//! Groups are cut at SLS's limits (4096 logs, about 3 MiB of raw protobuf per request).
//!
//! ```toml
//! [sink]
//! type = "sls"
//! endpoint = "https://cn-hangzhou.log.aliyuncs.com"
//! project = "k8s-logs"
//! logstore = "pods"
//! access_key_id = "${SLS_AK_ID}"
//! access_key_secret_file = "/var/run/secrets/sls/ak-secret"
//! topic = "{app}"
//! compression = "lz4"                 # or "zstd"
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};

use super::client::{self, ClientOptions, HttpClient, Secret, Template};
use super::http::validate_common;
use super::{Sink, SinkError, SinkErrorKind};
use crate::batch::{Batch, Encoder, Event};
use crate::config::{Compression, Dur};

/// Logs per `LogGroup` (the API's limit is 4096).
const MAX_LOGS: usize = 4096;
/// Raw protobuf bytes per request (the API's limit is 5 MiB).
const MAX_RAW: usize = 3 << 20;

/// `[sink] type = "sls"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SlsSinkConfig {
    /// Region endpoint, e.g. `https://cn-hangzhou.log.aliyuncs.com` (`https://` if no scheme).
    pub endpoint: String,
    /// Project.
    pub project: String,
    /// Logstore.
    pub logstore: String,
    /// AccessKey id.
    pub access_key_id: String,
    /// AccessKey secret.
    #[serde(default)]
    pub access_key_secret: Option<Secret>,
    /// File holding the AccessKey secret.
    #[serde(default)]
    pub access_key_secret_file: Option<PathBuf>,
    /// STS security token, for temporary credentials.
    #[serde(default)]
    pub security_token: Option<Secret>,
    /// Topic template of the path tags (`{app}`); empty for none.
    #[serde(default)]
    pub topic: String,
    /// `Source` of each group; the host name when absent.
    #[serde(default)]
    pub source: Option<String>,
    /// `lz4` (default) or `zstd`.
    #[serde(default = "defaults::compression")]
    pub compression: SlsCompression,
    /// PEM file of CA certificates to trust.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Whole-request timeout.
    #[serde(default = "defaults::timeout")]
    pub timeout: Dur,
    /// Batches sent at once (each one request); acknowledged to the checkpoint in order.
    #[serde(default = "super::default_concurrency")]
    pub concurrency: usize,
}

/// Body compression of `PutLogs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlsCompression {
    /// Raw lz4 block.
    Lz4,
    /// zstd frame.
    Zstd,
}

mod defaults {
    use super::*;
    pub fn compression() -> SlsCompression {
        SlsCompression::Lz4
    }
    pub fn timeout() -> Dur {
        Dur(Duration::from_secs(30))
    }
}

impl SlsSinkConfig {
    /// The body is built and compressed here.
    pub fn stage_compression(&self) -> (Compression, i32) {
        (Compression::None, 0)
    }

    /// Checks what serde can't; errors are `(key, message)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        validate_common(None, self.timeout)?;
        if self.endpoint.trim().is_empty() {
            return Err(("endpoint", "is empty".into()));
        }
        for (k, v) in [
            ("project", &self.project),
            ("logstore", &self.logstore),
            ("access_key_id", &self.access_key_id),
        ] {
            if v.is_empty() || v.contains(['/', '?', '#', ' ']) {
                return Err((k, format!("{v:?} is empty or not a name")));
            }
        }
        if self.access_key_secret.is_some() == self.access_key_secret_file.is_some() {
            return Err((
                "access_key_secret",
                "needs exactly one of access_key_secret and access_key_secret_file".into(),
            ));
        }
        Template::parse(&self.topic).map_err(|e| ("topic", e))?;
        Ok(())
    }
}

/// The `LogGroup` protobuf of the SLS API (`sls_logs.proto`).
pub mod proto {
    /// One log.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Log {
        /// Seconds since the epoch.
        #[prost(uint32, required, tag = "1")]
        pub time: u32,
        /// Key/value pairs.
        #[prost(message, repeated, tag = "2")]
        pub contents: Vec<Content>,
        /// Nanoseconds within the second.
        #[prost(fixed32, optional, tag = "4")]
        pub time_ns: Option<u32>,
    }
    /// `Log.Content`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Content {
        /// Key.
        #[prost(string, required, tag = "1")]
        pub key: String,
        /// Value.
        #[prost(string, required, tag = "2")]
        pub value: String,
    }
    /// A tag of the whole group.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LogTag {
        /// Key.
        #[prost(string, required, tag = "1")]
        pub key: String,
        /// Value.
        #[prost(string, required, tag = "2")]
        pub value: String,
    }
    /// The body of `PutLogs`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LogGroup {
        /// Logs.
        #[prost(message, repeated, tag = "1")]
        pub logs: Vec<Log>,
        /// Unused.
        #[prost(string, optional, tag = "2")]
        pub reserved: Option<String>,
        /// Topic.
        #[prost(string, optional, tag = "3")]
        pub topic: Option<String>,
        /// Source (the collector's host).
        #[prost(string, optional, tag = "4")]
        pub source: Option<String>,
        /// Tags.
        #[prost(message, repeated, tag = "6")]
        pub log_tags: Vec<LogTag>,
    }
}

/// Each event as `<collection time in ns> <message>\n` (like the Loki sink's).
#[derive(Debug, Default, Clone, Copy)]
pub struct SlsEncoder;

impl Encoder for SlsEncoder {
    fn encode(&mut self, ev: &Event<'_>, out: &mut Vec<u8>) {
        super::loki::LokiEncoder.encode(ev, out);
    }
}

/// The string SLS signs: verb, Content-MD5, Content-Type, Date, canonical headers, resource.
pub fn string_to_sign(
    verb: &str,
    content_md5: &str,
    content_type: &str,
    date: &str,
    headers: &[(&str, &str)],
    resource: &str,
) -> String {
    let mut canon: Vec<(String, &str)> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), *v))
        .filter(|(k, _)| k.starts_with("x-log-") || k.starts_with("x-acs-"))
        .collect();
    canon.sort();
    let canon: Vec<String> = canon.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    format!(
        "{verb}\n{content_md5}\n{content_type}\n{date}\n{}\n{resource}",
        canon.join("\n")
    )
}

/// base64(HMAC-SHA1(secret, string)).
pub fn sign(secret: &str, string: &str) -> String {
    use base64::Engine as _;
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(string.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Sends `LogGroup`s with `PutLogs`.
#[derive(Debug)]
pub struct SlsSink {
    url: String,
    host: Option<String>,
    resource: String,
    key_id: String,
    secret: Secret,
    token: Option<Secret>,
    topic: Template,
    source: String,
    compression: SlsCompression,
    client: HttpClient,
    /// Groups of batch `seq` already accepted (by group index).
    partial: Option<(u64, Vec<bool>)>,
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "voltail".into())
}

fn format_error(message: String) -> SinkError {
    SinkError {
        sink: "sls",
        kind: SinkErrorKind::Permanent,
        reason: "format",
        message,
        retry_after: None,
    }
}

impl SlsSink {
    /// Builds the client and reads the secret.
    pub fn new(cfg: &SlsSinkConfig) -> Result<SlsSink, SinkError> {
        let (scheme, host) = match cfg.endpoint.split_once("://") {
            Some((s, h)) => (s, h.trim_end_matches('/')),
            None => ("https", cfg.endpoint.trim_end_matches('/')),
        };
        let bare = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
        let is_ip = bare.parse::<std::net::IpAddr>().is_ok() || bare == "localhost";
        let resource = format!("/logstores/{}/shards/lb", cfg.logstore);
        // An IP endpoint can't take the project as a subdomain: it goes in the Host header, as
        // the SLS SDKs do.
        let (url, explicit_host) = if is_ip {
            (
                format!("{scheme}://{host}{resource}"),
                Some(format!("{}.{host}", cfg.project)),
            )
        } else {
            (format!("{scheme}://{}.{host}{resource}", cfg.project), None)
        };
        let secret = match (&cfg.access_key_secret, &cfg.access_key_secret_file) {
            (Some(s), _) => s.clone(),
            (None, Some(p)) => Secret(client::read_secret_file("sls", p)?),
            (None, None) => return Err(client::config_error("sls", "no access_key_secret".into())),
        };
        let opts = ClientOptions {
            timeout: cfg.timeout.0,
            headers: Vec::new(),
            auth: None,
            ca_file: cfg.ca_file.clone(),
        };
        Ok(SlsSink {
            url,
            host: explicit_host,
            resource,
            key_id: cfg.access_key_id.clone(),
            secret,
            token: cfg.security_token.clone(),
            topic: Template::parse(&cfg.topic).map_err(|e| client::config_error("sls", e))?,
            source: cfg.source.clone().unwrap_or_else(hostname),
            compression: cfg.compression,
            client: HttpClient::new("sls", &opts)?,
            partial: None,
        })
    }

    /// The batch's events as `LogGroup`s (what `send` encodes, compresses and signs, one
    /// request each): per file, cut at the API's limits. Public for the `sls_groups` fuzz target.
    pub fn groups(&self, batch: &Batch) -> Result<Vec<proto::LogGroup>, SinkError> {
        let mut groups: Vec<proto::LogGroup> = Vec::new();
        // Index in `groups` of the open group of each file, and its raw size so far.
        let mut open: HashMap<u32, (usize, usize)> = HashMap::new();
        for (i, ev) in batch.events.iter().enumerate() {
            let bytes = batch.event_bytes(i);
            let sp = memchr::memchr(b' ', bytes)
                .ok_or_else(|| format_error(format!("event {i} is not an sls event")))?;
            let ts: u128 = std::str::from_utf8(&bytes[..sp])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format_error(format!("event {i} has no time")))?;
            let msg = &bytes[sp + 1..];
            let msg = msg.strip_suffix(b"\n").unwrap_or(msg);
            let size = msg.len() + 32;
            let slot = open.get(&ev.file).copied();
            let g = match slot {
                Some((g, raw)) if groups[g].logs.len() < MAX_LOGS && raw + size <= MAX_RAW => {
                    open.insert(ev.file, (g, raw + size));
                    g
                }
                _ => {
                    let m = &batch.files[ev.file as usize];
                    let mut tags = vec![proto::LogTag {
                        key: "__path__".into(),
                        value: m.path.clone(),
                    }];
                    tags.extend(m.tags.iter().map(|(k, v)| proto::LogTag {
                        key: super::loki::extra_name(k, &["__path__"]).into_owned(),
                        value: v.clone(),
                    }));
                    groups.push(proto::LogGroup {
                        logs: Vec::new(),
                        reserved: None,
                        topic: Some(self.topic.render(m)),
                        source: Some(self.source.clone()),
                        log_tags: tags,
                    });
                    open.insert(ev.file, (groups.len() - 1, size));
                    groups.len() - 1
                }
            };
            groups[g].logs.push(proto::Log {
                time: (ts / 1_000_000_000) as u32,
                contents: vec![proto::Content {
                    key: "content".into(),
                    value: String::from_utf8_lossy(msg).into_owned(),
                }],
                time_ns: Some((ts % 1_000_000_000) as u32),
            });
        }
        Ok(groups)
    }

    /// One signed `PutLogs`.
    fn put(&self, group: &proto::LogGroup) -> Result<(), SinkError> {
        use md5::Digest as _;
        let raw = prost::Message::encode_to_vec(group);
        let (body, compress) = match self.compression {
            SlsCompression::Lz4 => (lz4_flex::block::compress(&raw), "lz4"),
            SlsCompression::Zstd => (
                zstd::bulk::compress(&raw, 1).map_err(|e| format_error(format!("zstd: {e}")))?,
                "zstd",
            ),
        };
        let md5: String = md5::Md5::digest(&body)
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        let raw_size = raw.len().to_string();
        let content_type = "application/x-protobuf";
        let mut log_headers: Vec<(&str, &str)> = vec![
            ("x-log-apiversion", "0.6.0"),
            ("x-log-bodyrawsize", &raw_size),
            ("x-log-compresstype", compress),
            ("x-log-signaturemethod", "hmac-sha1"),
        ];
        if let Some(t) = &self.token {
            log_headers.push(("x-acs-security-token", t.0.as_str()));
        }
        let to_sign = string_to_sign(
            "POST",
            &md5,
            content_type,
            &date,
            &log_headers,
            &self.resource,
        );
        let authorization = format!("LOG {}:{}", self.key_id, sign(&self.secret.0, &to_sign));
        let mut headers = log_headers;
        headers.push(("Content-Type", content_type));
        headers.push(("Content-MD5", &md5));
        headers.push(("Date", &date));
        headers.push(("Authorization", &authorization));
        if let Some(h) = &self.host {
            headers.push(("Host", h));
        }
        match self.client.post(&self.url, &headers, &body, raw.len()) {
            Ok(_) => Ok(()),
            // SLS answers 403 `WriteQuotaExceed`/`ShardWriteQuotaExceed` when writing too fast.
            Err(mut e) if e.message.contains("QuotaExceed") => {
                e.kind = SinkErrorKind::Transient;
                e.reason = "quota";
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}

impl Sink for SlsSink {
    fn name(&self) -> &'static str {
        "sls"
    }

    fn send(&mut self, batch: &Batch) -> Result<(), SinkError> {
        if batch.events.is_empty() {
            return Ok(());
        }
        let groups = self.groups(batch)?;
        let mut done = match self.partial.take() {
            Some((seq, d)) if seq == batch.seq && d.len() == groups.len() => d,
            _ => vec![false; groups.len()],
        };
        for (g, group) in groups.iter().enumerate() {
            if done[g] {
                continue;
            }
            if let Err(e) = self.put(group) {
                if e.kind == SinkErrorKind::Transient {
                    self.partial = Some((batch.seq, done));
                }
                return Err(e);
            }
            done[g] = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchBuilder, BatchLimits, FileMeta, Timestamp};
    use std::sync::Arc;

    #[test]
    fn a_tag_named_path_does_not_repeat_the_path_tag() {
        // Regression (fuzz target `sls_groups`): a tag named `__path__` made a second
        // `__path__` log tag.
        let m = Arc::new(FileMeta::new(
            1,
            Arc::from("s"),
            "/f".into(),
            vec![("__path__".into(), "p".into())],
            7,
        ));
        let limits = BatchLimits {
            max_bytes: 1 << 10,
            max_events: 8,
            linger: Duration::from_secs(1),
        };
        let mut b = BatchBuilder::new(limits, Box::new(SlsEncoder));
        b.push(&m, b"hi", 0, 3, &Timestamp::now());
        let batch = b.take().expect("one event");
        let cfg: SlsSinkConfig = toml::from_str(
            "endpoint = \"https://x\"\nproject = \"p\"\nlogstore = \"l\"\n\
             access_key_id = \"i\"\naccess_key_secret = \"s\"\nsource = \"h\"",
        )
        .expect("cfg");
        let groups = SlsSink::new(&cfg)
            .expect("sink")
            .groups(&batch)
            .expect("groups");
        let tags: Vec<(&str, &str)> = groups[0]
            .log_tags
            .iter()
            .map(|t| (t.key.as_str(), t.value.as_str()))
            .collect();
        assert_eq!(tags, [("__path__", "/f"), ("__path___extracted", "p")]);
    }

    #[test]
    fn canonical_headers_are_sorted_and_filtered() {
        let s = string_to_sign(
            "POST",
            "ABC",
            "application/x-protobuf",
            "Mon, 03 Nov 2025 10:00:00 GMT",
            &[
                ("x-log-signaturemethod", "hmac-sha1"),
                ("x-log-apiversion", "0.6.0"),
                ("X-Acs-Security-Token", "t"),
                ("Content-Length", "3"),
            ],
            "/logstores/ls/shards/lb",
        );
        assert_eq!(
            s,
            "POST\nABC\napplication/x-protobuf\nMon, 03 Nov 2025 10:00:00 GMT\nx-acs-security-token:t\nx-log-apiversion:0.6.0\nx-log-signaturemethod:hmac-sha1\n/logstores/ls/shards/lb"
        );
        // RFC 2202 test case 2 for HMAC-SHA1.
        assert_eq!(
            sign("Jefe", "what do ya want for nothing?"),
            "7/zfauXrL6LSdBbV8YTfnCWafHk="
        );
    }
}
