//! The `elasticsearch` sink: the `_bulk` API of Elasticsearch and OpenSearch.
//!
//! The encoder ([`BulkEncoder`]) writes each event as its action line and document, so that a
//! batch payload is a ready `_bulk` body and each event's slice (`Batch::event_bytes`) is a
//! ready bulk item. Every action carries `_id` = the event's stable id, which makes re-sending
//! harmless: with `create` (the default, and what data streams need) a document that is already
//! there answers 409, which counts as delivered; with `index` it is overwritten by itself.
//!
//! A 2xx `_bulk` answer may still report per-item failures. Items that failed with 429 or 5xx
//! are remembered, and when the uploader sends the same batch again (after its backoff) only
//! those are sent; meanwhile the batch is reported as a transient failure. Items refused for good
//! (mapping errors) make the batch a permanent failure once nothing retryable is left, with
//! Elasticsearch's reason; the uploader dead-letters the whole batch, including the items that
//! were indexed (they are marked in the message count, and ids keep a later replay idempotent).
//!
//! Compression is gzip in the sink (Elasticsearch has no zstd request bodies), after slicing.
//!
//! ```toml
//! [sink]
//! type = "elasticsearch"              # OpenSearch too
//! endpoint = "https://es:9200"
//! index = "logs-{namespace}"          # a data stream needs action = "create" (the default)
//! auth = { type = "apikey", key = "${ES_API_KEY}" }
//! ca_file = "/etc/voltail/es-ca.pem"
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::client::{self, Auth, ClientOptions, HttpClient, Secret, Template};
use super::http::{validate_common, validate_url};
use super::{Sink, SinkError, SinkErrorKind};
use crate::batch::{escape_json, Batch, Encoder, Event, FileKey, NdjsonEncoder};
use crate::config::{Compression, Dur};

/// The bulk action written for each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BulkAction {
    /// `create`: fails with 409 when the id exists (counted as delivered); data streams need it.
    Create,
    /// `index`: replaces the document with the same id.
    Index,
}

/// `[sink] type = "elasticsearch"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ElasticsearchSinkConfig {
    /// Base URL of the cluster (or of one node / a load balancer), e.g. `https://es:9200`.
    pub endpoint: String,
    /// Index or data stream; `{tag}` and `{source}` are replaced per file (`logs-{namespace}`),
    /// and the result lowercased.
    #[serde(default = "defaults::index")]
    pub index: String,
    /// `create` (default) or `index`.
    #[serde(default = "defaults::action")]
    pub action: BulkAction,
    /// `gzip` (default) or `none`.
    #[serde(default = "defaults::compression")]
    pub compression: Compression,
    /// Extra headers (treated as secrets).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, Secret>,
    /// Authentication (`basic`, `bearer` or `apikey`).
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
    pub fn index() -> String {
        "voltail-{source}".into()
    }
    pub fn action() -> BulkAction {
        BulkAction::Create
    }
    pub fn compression() -> Compression {
        Compression::Gzip
    }
    pub fn timeout() -> Dur {
        Dur(Duration::from_secs(60))
    }
}

impl ElasticsearchSinkConfig {
    /// The batch stage never compresses: the sink slices the payload into items first.
    pub fn stage_compression(&self) -> (Compression, i32) {
        (Compression::None, 0)
    }

    /// Checks what serde can't; errors are `(key, message)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        validate_url("endpoint", &self.endpoint)?;
        validate_common(self.auth.as_ref(), self.timeout)?;
        if self.compression == Compression::Zstd {
            return Err(("compression", "elasticsearch takes gzip or none".into()));
        }
        Template::parse(&self.index).map_err(|e| ("index", e))?;
        if self.index.is_empty() || self.index.starts_with(['_', '-', '+']) {
            return Err(("index", format!("{:?} is not an index name", self.index)));
        }
        Ok(())
    }
}

/// Writes `{"<action>":{"_index":..,"_id":..}}\n{document}\n` per event; the document is the
/// NDJSON object with `@timestamp` (what data streams and Kibana expect) for `timestamp`.
#[derive(Debug)]
pub struct BulkEncoder {
    action: &'static str,
    index: Template,
    /// The rendered, escaped index of the last file seen.
    last: Option<(FileKey, Vec<u8>)>,
    scratch: Vec<u8>,
}

impl BulkEncoder {
    /// An encoder for `cfg` (validated).
    pub fn new(cfg: &ElasticsearchSinkConfig) -> BulkEncoder {
        BulkEncoder {
            action: match cfg.action {
                BulkAction::Create => "create",
                BulkAction::Index => "index",
            },
            index: Template::parse(&cfg.index).unwrap_or_else(|_| Template::literal(&cfg.index)),
            last: None,
            scratch: Vec::new(),
        }
    }
}

impl Encoder for BulkEncoder {
    fn encode(&mut self, ev: &Event<'_>, out: &mut Vec<u8>) {
        if self.last.as_ref().map(|l| l.0) != Some(ev.meta.key) {
            let mut esc = Vec::new();
            // Index names are lowercase in Elasticsearch; tags need not be.
            let index = self.index.render(ev.meta).to_lowercase();
            escape_json(index.as_bytes(), &mut esc);
            self.last = Some((ev.meta.key, esc));
        }
        let (_, index) = self.last.as_ref().expect("set above");
        out.extend_from_slice(b"{\"");
        out.extend_from_slice(self.action.as_bytes());
        out.extend_from_slice(b"\":{\"_index\":\"");
        out.extend_from_slice(index);
        out.extend_from_slice(b"\",\"_id\":\"");
        super::http::push_event_id(ev.meta.fingerprint, ev.offset, out);
        out.extend_from_slice(b"\"}}\n{\"@");
        self.scratch.clear();
        NdjsonEncoder.encode(ev, &mut self.scratch);
        // The NDJSON object starts with `{"timestamp"`: keep all but its `{"`.
        out.extend_from_slice(&self.scratch[2..]);
    }
}

#[derive(Debug, Deserialize)]
struct BulkResponse {
    #[serde(default)]
    errors: bool,
    #[serde(default)]
    items: Vec<HashMap<String, BulkItem>>,
}

#[derive(Debug, Deserialize)]
struct BulkItem {
    status: u16,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// What became of each event of the batch being delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ItemState {
    /// Not yet accepted.
    Pending,
    /// Indexed (or already there).
    Done,
    /// Refused for good.
    Rejected,
}

/// Sends batches to `_bulk`.
#[derive(Debug)]
pub struct ElasticsearchSink {
    url: String,
    gzip: bool,
    create: bool,
    client: HttpClient,
    /// Item states of the batch whose retryable items are still pending (by `Batch::seq`), and
    /// the first permanent reason seen for it.
    partial: Option<(u64, Vec<ItemState>, Option<String>)>,
}

impl ElasticsearchSink {
    /// Builds the client.
    pub fn new(cfg: &ElasticsearchSinkConfig) -> Result<ElasticsearchSink, SinkError> {
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
        Ok(ElasticsearchSink {
            // Only what `send` reads: the answer for 8192 items shrinks several times.
            url: format!(
                "{}/_bulk?filter_path=errors,items.*.status,items.*.error.type,items.*.error.reason",
                cfg.endpoint.trim_end_matches('/')
            ),
            gzip: cfg.compression == Compression::Gzip,
            create: cfg.action == BulkAction::Create,
            client: HttpClient::new("elasticsearch", &opts)?,
            partial: None,
        })
    }
}

fn err(kind: SinkErrorKind, reason: &'static str, message: String) -> SinkError {
    SinkError {
        sink: "elasticsearch",
        kind,
        reason,
        message,
        retry_after: None,
    }
}

/// `type: reason` of a bulk item error.
fn item_reason(e: &Option<serde_json::Value>) -> String {
    match e {
        Some(v) => {
            let t = v.get("type").and_then(|t| t.as_str()).unwrap_or("error");
            let r = v.get("reason").and_then(|t| t.as_str()).unwrap_or("");
            client::snippet(format!("{t}: {r}").as_bytes())
        }
        None => "no reason given".into(),
    }
}

impl Sink for ElasticsearchSink {
    fn name(&self) -> &'static str {
        "elasticsearch"
    }

    fn send(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let n = batch.events.len();
        if n == 0 {
            return Ok(());
        }
        if batch.compression != Compression::None {
            return Err(err(
                SinkErrorKind::Permanent,
                "format",
                "compressed batch for the elasticsearch sink".into(),
            ));
        }
        let (mut states, mut rejected) = match self.partial.take() {
            Some((seq, s, r)) if seq == batch.seq && s.len() == n => (s, r),
            _ => (vec![ItemState::Pending; n], None),
        };
        let todo: Vec<usize> = (0..n)
            .filter(|&i| states[i] == ItemState::Pending)
            .collect();
        let body: std::borrow::Cow<'_, [u8]> = if todo.len() == n {
            std::borrow::Cow::Borrowed(&batch.payload)
        } else {
            self.client.metrics.items_retried(todo.len());
            let mut b = Vec::new();
            for &i in &todo {
                b.extend_from_slice(batch.event_bytes(i));
            }
            std::borrow::Cow::Owned(b)
        };
        let raw = body.len();
        let (body, encoding) = if self.gzip {
            (
                std::borrow::Cow::Owned(client::gzip(&body, 3)),
                Some("gzip"),
            )
        } else {
            (body, None)
        };
        let mut headers = vec![("Content-Type", "application/x-ndjson")];
        if let Some(e) = encoding {
            headers.push(("Content-Encoding", e));
        }
        let resp = match self.client.post(&self.url, &headers, &body, raw) {
            Ok(r) => r,
            Err(e) => {
                // Keep what was learnt: the next attempt still skips items already indexed.
                self.partial = Some((batch.seq, states, rejected));
                return Err(e);
            }
        };
        let parsed: BulkResponse = match serde_json::from_slice(&resp.body) {
            Ok(p) => p,
            Err(e) => {
                self.partial = Some((batch.seq, states, rejected));
                return Err(err(
                    SinkErrorKind::Transient,
                    "format",
                    format!("unreadable _bulk answer: {e}"),
                ));
            }
        };
        if !parsed.errors {
            for &i in &todo {
                states[i] = ItemState::Done;
            }
        } else if parsed.items.len() != todo.len() {
            self.partial = Some((batch.seq, states, rejected));
            return Err(err(
                SinkErrorKind::Transient,
                "format",
                format!(
                    "_bulk answered {} items for {} sent",
                    parsed.items.len(),
                    todo.len()
                ),
            ));
        }
        let mut retryable = 0;
        let mut first_retry_reason = None;
        let items = if parsed.errors {
            &parsed.items[..]
        } else {
            &[]
        };
        for (item, &i) in items.iter().zip(&todo) {
            let Some(r) = item.values().next() else {
                continue;
            };
            match r.status {
                200..=299 => states[i] = ItemState::Done,
                409 if self.create => states[i] = ItemState::Done,
                429 | 500..=599 => {
                    retryable += 1;
                    first_retry_reason.get_or_insert_with(|| item_reason(&r.error));
                }
                _ => {
                    states[i] = ItemState::Rejected;
                    self.client.metrics.failure("item_rejected");
                    rejected.get_or_insert_with(|| {
                        format!("HTTP {}: {}", r.status, item_reason(&r.error))
                    });
                }
            }
        }
        let refused = states.iter().filter(|s| **s == ItemState::Rejected).count();
        if retryable > 0 {
            self.client.metrics.failure("item_retryable");
            self.partial = Some((batch.seq, states, rejected));
            return Err(err(
                SinkErrorKind::Transient,
                "bulk_items",
                format!(
                    "{retryable} of {n} items not indexed yet ({}); they alone are sent again",
                    first_retry_reason.unwrap_or_default()
                ),
            ));
        }
        if refused > 0 {
            return Err(err(
                SinkErrorKind::Permanent,
                "bulk_items",
                format!(
                    "{refused} of {n} items refused ({}); the other {} are indexed",
                    rejected.unwrap_or_default(),
                    n - refused
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{FileMeta, Timestamp};
    use std::sync::Arc;

    #[test]
    fn action_and_document_lines() {
        let cfg: ElasticsearchSinkConfig =
            toml::from_str("endpoint = \"http://x\"\nindex = \"logs-{ns}\"").expect("cfg");
        assert!(cfg.validate().is_ok());
        let m = FileMeta::new(
            1,
            Arc::from("s"),
            "/f".into(),
            vec![("ns".into(), "a\"b".into())],
            0x5,
        );
        let ts = Timestamp::now();
        let mut out = Vec::new();
        BulkEncoder::new(&cfg).encode(
            &Event {
                message: b"hello",
                offset: 10,
                meta: &m,
                timestamp: &ts,
            },
            &mut out,
        );
        let text = String::from_utf8(out).expect("utf8");
        let mut it = text.lines();
        let action: serde_json::Value =
            serde_json::from_str(it.next().expect("action")).expect("json");
        assert_eq!(action["create"]["_index"], "logs-a\"b");
        assert_eq!(action["create"]["_id"], "0000000000000005-a");
        let doc: serde_json::Value = serde_json::from_str(it.next().expect("doc")).expect("json");
        assert_eq!(doc["message"], "hello");
        assert_eq!(doc["@timestamp"], ts.rfc3339());
        assert!(doc.get("timestamp").is_none());
        assert!(it.next().is_none());
    }
}
