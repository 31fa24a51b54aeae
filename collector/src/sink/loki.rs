//! The `loki` sink: Grafana Loki's push API (`POST /loki/api/v1/push`, protobuf + snappy).
//!
//! A stream is a set of labels: the configured static labels plus the file's tags named in the
//! `labels` allow-list (`source` names the source), so label cardinality stays what the operator
//! chose. The other tags and the file path go with each entry as structured metadata (Loki 2.9+)
//! or, with `extra = "json"`, into the line as a JSON object (`| json` in LogQL); a tag named
//! `file` (or `message` in a JSON line) goes as `file_extracted` (`message_extracted`). A tag
//! named `source` is never a label (the `source` label is the source name).
//!
//! Entries of a stream are sent in file order with non-decreasing timestamps: an entry whose
//! collection time is before the previous one's (clock steps, two files of one stream read out of
//! order) takes the previous timestamp, across batches too. A re-sent batch carries the same
//! timestamps and lines, which Loki deduplicates.
//!
//! The encoder ([`LokiEncoder`]) stores each event as its timestamp and raw message, one per
//! line; this sink groups them into streams at send time. It does not compress through the batch stage: the body
//! is snappy-compressed here as Loki requires.
//!
//! ```toml
//! [sink]
//! type = "loki"
//! endpoint = "http://loki:3100"
//! tenant_id = "team-a"
//! labels = ["namespace", "app"]       # tags that become labels; keep them bounded
//! static_labels = { cluster = "prod-1" }
//! extra = "metadata"                  # other tags + file: structured metadata, or "json"
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::client::{Auth, ClientOptions, HttpClient, Secret};
use super::http::{validate_common, validate_url};
use super::{Sink, SinkError, SinkErrorKind};
use crate::batch::{escape_json, Batch, Encoder, Event, FileMeta};
use crate::config::{Compression, Dur};

/// Where the tags that are not labels go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LokiExtra {
    /// Structured metadata of each entry (Loki 2.9+ with `allow_structured_metadata`).
    Metadata,
    /// The line becomes `{"message":..,"file":..,<tag>:..}`.
    Json,
}

/// `[sink] type = "loki"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LokiSinkConfig {
    /// Base URL, e.g. `http://loki:3100` (the push path is appended).
    pub endpoint: String,
    /// `X-Scope-OrgID`, for multi-tenant Loki.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// Tags that become labels (`source` is the source name); keep it to bounded values.
    #[serde(default = "defaults::labels")]
    pub labels: Vec<String>,
    /// Labels added to every stream.
    #[serde(default)]
    pub static_labels: BTreeMap<String, String>,
    /// `metadata` (default) or `json`.
    #[serde(default = "defaults::extra")]
    pub extra: LokiExtra,
    /// Extra headers (treated as secrets).
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// Authentication.
    #[serde(default)]
    pub auth: Option<Auth>,
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

mod defaults {
    use super::*;
    pub fn labels() -> Vec<String> {
        vec!["source".into()]
    }
    pub fn extra() -> LokiExtra {
        LokiExtra::Metadata
    }
    pub fn timeout() -> Dur {
        Dur(Duration::from_secs(30))
    }
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with("__")
}

impl LokiSinkConfig {
    /// The batch stage never compresses: the body is built and snappy-compressed here.
    pub fn stage_compression(&self) -> (Compression, i32) {
        (Compression::None, 0)
    }

    /// Checks what serde can't; errors are `(key, message)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        validate_url("endpoint", &self.endpoint)?;
        validate_common(self.auth.as_ref(), self.timeout)?;
        for l in &self.labels {
            if !is_label_name(l) {
                return Err(("labels", format!("{l:?} is not a Loki label name")));
            }
        }
        for k in self.static_labels.keys() {
            if !is_label_name(k) {
                return Err(("static_labels", format!("{k:?} is not a Loki label name")));
            }
        }
        if self.labels.is_empty() && self.static_labels.is_empty() {
            return Err((
                "labels",
                "a stream needs at least one label (labels or static_labels)".into(),
            ));
        }
        Ok(())
    }
}

/// Loki's push protobuf (`pkg/push/push.proto`), the messages the push path reads.
pub mod proto {
    /// `logproto.PushRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushRequest {
        /// The streams.
        #[prost(message, repeated, tag = "1")]
        pub streams: Vec<Stream>,
    }
    /// `logproto.StreamAdapter`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Stream {
        /// `{name="value", ...}`.
        #[prost(string, tag = "1")]
        pub labels: String,
        /// Entries in order.
        #[prost(message, repeated, tag = "2")]
        pub entries: Vec<Entry>,
        /// Unused by the push path.
        #[prost(uint64, tag = "3")]
        pub hash: u64,
    }
    /// `logproto.EntryAdapter`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Entry {
        /// When.
        #[prost(message, optional, tag = "1")]
        pub timestamp: Option<Timestamp>,
        /// The line.
        #[prost(string, tag = "2")]
        pub line: String,
        /// Structured metadata.
        #[prost(message, repeated, tag = "3")]
        pub structured_metadata: Vec<LabelPair>,
    }
    /// `logproto.LabelPairAdapter`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LabelPair {
        /// Name.
        #[prost(string, tag = "1")]
        pub name: String,
        /// Value.
        #[prost(string, tag = "2")]
        pub value: String,
    }
    /// `google.protobuf.Timestamp`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Timestamp {
        /// Seconds since the epoch.
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        /// Nanoseconds within the second.
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }
}

/// Each event as `<collection time in ns> <message>\n`: compact, and readable in a
/// dead-letter file.
#[derive(Debug, Default, Clone, Copy)]
pub struct LokiEncoder;

impl Encoder for LokiEncoder {
    fn encode(&mut self, ev: &Event<'_>, out: &mut Vec<u8>) {
        out.extend_from_slice(
            itoa::Buffer::new()
                .format(ev.timestamp.unix_nanos)
                .as_bytes(),
        );
        out.push(b' ');
        out.extend_from_slice(ev.message);
        out.push(b'\n');
    }
}

/// Splits a [`LokiEncoder`] event into its time and message.
fn decode_event(bytes: &[u8]) -> Option<(u128, &[u8])> {
    let sp = memchr::memchr(b' ', bytes)?;
    let ts = std::str::from_utf8(&bytes[..sp]).ok()?.parse().ok()?;
    let msg = &bytes[sp + 1..];
    Some((ts, msg.strip_suffix(b"\n").unwrap_or(msg)))
}

/// Pushes batches to Loki.
#[derive(Debug)]
pub struct LokiSink {
    url: String,
    tenant: Option<String>,
    labels: Vec<String>,
    static_labels: BTreeMap<String, String>,
    extra: LokiExtra,
    client: HttpClient,
    /// Last timestamp sent per stream (bounded by the label allow-list).
    last_ts: HashMap<String, u128>,
}

/// How one file's events are rendered: its stream and what goes with each entry.
struct FileRender {
    stream: usize,
    metadata: Vec<proto::LabelPair>,
    /// For `extra = "json"`: `,"file":..,"<tag>":..}` after the message.
    json_tail: Vec<u8>,
}

/// The name a tag that is not a label goes by in an entry: a tag named like one of the entry's
/// own fields (`own`: `file`, and `message` in a JSON line) takes the suffix `_extracted`, as
/// Loki names a parsed label that clashes with a stream label, so no name is there twice.
pub(crate) fn extra_name<'a>(tag: &'a str, own: &[&str]) -> std::borrow::Cow<'a, str> {
    if own.contains(&tag) {
        format!("{tag}_extracted").into()
    } else {
        tag.into()
    }
}

/// Escapes a label value for the `{name="value"}` form.
fn push_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

impl LokiSink {
    /// Builds the client.
    pub fn new(cfg: &LokiSinkConfig) -> Result<LokiSink, SinkError> {
        let opts = ClientOptions {
            timeout: cfg.timeout.0,
            headers: cfg
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            auth: cfg.auth.clone(),
            ca_file: cfg.ca_file.clone(),
        };
        Ok(LokiSink {
            url: format!("{}/loki/api/v1/push", cfg.endpoint.trim_end_matches('/')),
            tenant: cfg.tenant_id.clone(),
            labels: cfg.labels.clone(),
            static_labels: cfg.static_labels.clone(),
            extra: cfg.extra,
            client: HttpClient::new("loki", &opts)?,
            last_ts: HashMap::new(),
        })
    }

    /// The stream labels of `m`, in Loki's canonical form (sorted names).
    fn stream_labels(&self, m: &FileMeta) -> String {
        let mut pairs: BTreeMap<&str, &str> = self
            .static_labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        for l in &self.labels {
            let v = if l == "source" {
                Some(&*m.source)
            } else {
                m.tags.iter().find(|(k, _)| k == l).map(|(_, v)| v.as_str())
            };
            if let Some(v) = v {
                pairs.insert(l, v);
            }
        }
        let mut s = String::from("{");
        for (i, (k, v)) in pairs.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            s.push_str(k);
            s.push_str("=\"");
            push_label_value(v, &mut s);
            s.push('"');
        }
        s.push('}');
        s
    }

    /// Builds the push request for `batch` (what `send` encodes and snappy-compresses), and the
    /// last timestamp of each stream in it. Changes nothing: `send` records the timestamps only
    /// once the push is acknowledged. Public for the `loki_request` fuzz target.
    pub fn request(&self, batch: &Batch) -> Result<(proto::PushRequest, Vec<u128>), SinkError> {
        let mut streams: Vec<proto::Stream> = Vec::new();
        let mut last: Vec<u128> = Vec::new();
        let mut by_labels: HashMap<String, usize> = HashMap::new();
        let mut files: Vec<FileRender> = Vec::with_capacity(batch.files.len());
        for m in &batch.files {
            let labels = self.stream_labels(m);
            let stream = *by_labels.entry(labels.clone()).or_insert_with(|| {
                last.push(self.last_ts.get(&labels).copied().unwrap_or(0));
                streams.push(proto::Stream {
                    labels,
                    entries: Vec::new(),
                    hash: 0,
                });
                streams.len() - 1
            });
            let rest = m
                .tags
                .iter()
                // The `source` label is the source name: a tag named `source` is not it.
                .filter(|(k, _)| k == "source" || !self.labels.contains(k))
                .map(|(k, v)| (k.as_str(), v.as_str()));
            let mut metadata = Vec::new();
            let mut json_tail = Vec::new();
            match self.extra {
                LokiExtra::Metadata => {
                    metadata.push(proto::LabelPair {
                        name: "file".into(),
                        value: m.path.clone(),
                    });
                    metadata.extend(rest.map(|(k, v)| proto::LabelPair {
                        name: extra_name(k, &["file"]).into_owned(),
                        value: v.into(),
                    }));
                }
                LokiExtra::Json => {
                    json_tail.extend_from_slice(b"\",\"file\":\"");
                    escape_json(m.path.as_bytes(), &mut json_tail);
                    for (k, v) in rest {
                        json_tail.extend_from_slice(b"\",\"");
                        escape_json(
                            extra_name(k, &["message", "file"]).as_bytes(),
                            &mut json_tail,
                        );
                        json_tail.extend_from_slice(b"\":\"");
                        escape_json(v.as_bytes(), &mut json_tail);
                    }
                    json_tail.extend_from_slice(b"\"}");
                }
            }
            files.push(FileRender {
                stream,
                metadata,
                json_tail,
            });
        }
        let mut line_buf = Vec::new();
        for (i, ev) in batch.events.iter().enumerate() {
            let bytes = batch.event_bytes(i);
            let (ts, msg) = match decode_event(bytes) {
                Some(e) => e,
                None => {
                    return Err(SinkError {
                        sink: "loki",
                        kind: SinkErrorKind::Permanent,
                        reason: "format",
                        message: format!("event {i} of batch {} is not a loki event", batch.seq),
                        retry_after: None,
                    })
                }
            };
            let f = &files[ev.file as usize];
            let ts = ts.max(last[f.stream]);
            last[f.stream] = ts;
            let line = match self.extra {
                LokiExtra::Metadata => String::from_utf8_lossy(msg).into_owned(),
                LokiExtra::Json => {
                    line_buf.clear();
                    line_buf.extend_from_slice(b"{\"message\":\"");
                    escape_json(msg, &mut line_buf);
                    line_buf.extend_from_slice(&f.json_tail);
                    String::from_utf8_lossy(&line_buf).into_owned()
                }
            };
            streams[f.stream].entries.push(proto::Entry {
                timestamp: Some(proto::Timestamp {
                    seconds: (ts / 1_000_000_000) as i64,
                    nanos: (ts % 1_000_000_000) as i32,
                }),
                line,
                structured_metadata: f.metadata.clone(),
            });
        }
        Ok((proto::PushRequest { streams }, last))
    }
}

impl Sink for LokiSink {
    fn name(&self) -> &'static str {
        "loki"
    }

    fn send(&mut self, batch: &Batch) -> Result<(), SinkError> {
        if batch.events.is_empty() {
            return Ok(());
        }
        let (req, last) = self.request(batch)?;
        let raw = prost::Message::encode_to_vec(&req);
        let body = snap::raw::Encoder::new()
            .compress_vec(&raw)
            .map_err(|e| SinkError {
                sink: "loki",
                kind: SinkErrorKind::Permanent,
                reason: "format",
                message: format!("snappy: {e}"),
                retry_after: None,
            })?;
        let mut headers = vec![("Content-Type", "application/x-protobuf")];
        if let Some(t) = &self.tenant {
            headers.push(("X-Scope-OrgID", t.as_str()));
        }
        self.client.post(&self.url, &headers, &body, raw.len())?;
        // Only now: a failed push is sent again with the same timestamps.
        for (s, ts) in req.streams.into_iter().zip(last) {
            self.last_ts.insert(s.labels, ts);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchBuilder, BatchLimits, Timestamp};
    use std::sync::Arc;

    #[test]
    fn label_names_and_values() {
        assert!(is_label_name("namespace"));
        assert!(!is_label_name("9x"));
        assert!(!is_label_name("__name__"));
        assert!(!is_label_name("a-b"));
        let mut s = String::new();
        push_label_value("a\"b\\c\nd", &mut s);
        assert_eq!(s, "a\\\"b\\\\c\\nd");
        assert_eq!(decode_event(b"12 a b\n"), Some((12, &b"a b"[..])));
        assert_eq!(decode_event(b"x a"), None);
    }

    #[test]
    fn tags_named_source_file_or_message_are_kept_apart() {
        // Regression (fuzz target `loki_request`): a tag named `source` was dropped when `source`
        // was a label, and one named `file` or `message` put that name in an entry twice.
        let tags = [("source", "t"), ("file", "x.log"), ("message", "m")];
        let m = Arc::new(FileMeta::new(
            1,
            Arc::from("s"),
            "/f".into(),
            tags.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            7,
        ));
        let limits = BatchLimits {
            max_bytes: 1 << 10,
            max_events: 8,
            linger: Duration::from_secs(1),
        };
        let mut b = BatchBuilder::new(limits, Box::new(LokiEncoder));
        b.push(&m, b"hi", 0, 3, &Timestamp::now());
        let batch = b.take().expect("one event");
        let request = |extra: &str| {
            let cfg: LokiSinkConfig =
                toml::from_str(&format!("endpoint = \"http://l\"\nextra = \"{extra}\""))
                    .expect("cfg");
            let (req, _) = LokiSink::new(&cfg)
                .expect("sink")
                .request(&batch)
                .expect("request");
            assert_eq!(req.streams[0].labels, "{source=\"s\"}");
            req.streams[0].entries[0].clone()
        };
        let e = request("metadata");
        let names: Vec<(&str, &str)> = e
            .structured_metadata
            .iter()
            .map(|p| (p.name.as_str(), p.value.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("file", "/f"),
                ("source", "t"),
                ("file_extracted", "x.log"),
                ("message", "m")
            ]
        );
        assert_eq!(
            request("json").line,
            r#"{"message":"hi","file":"/f","source":"t","file_extracted":"x.log","message_extracted":"m"}"#
        );
    }
}
