//! The `clickhouse` sink: each batch is one `INSERT INTO <table> FORMAT JSONEachRow` over
//! ClickHouse's HTTP interface, gzip- (any version) or zstd-compressed (recent versions).
//!
//! Rows have the columns of [`TABLE_SCHEMA`]; the schema is documented there and in
//! [`ClickHouseSinkConfig`], and the insert skips columns the table doesn't have
//! (`input_format_skip_unknown_fields=1`), so a narrower table works too. With the suggested
//! `ReplacingMergeTree` ordered by `id`, rows a retry or a restart sends again are merged away
//! (query with `FINAL` to see them merged at once).
//!
//! ClickHouse answers most errors with HTTP 500 and a `Code: N` in the body; [`classify`] makes
//! the ones that will fail again the same way (unknown table, parse errors, bad credentials)
//! permanent. The sink does not create tables.
//!
//! ```toml
//! [sink]
//! type = "clickhouse"
//! endpoint = "http://clickhouse:8123"
//! database = "default"
//! table = "logs"
//! compression = "gzip"            # "zstd" on ClickHouse 21+
//! auth = { type = "basic", user = "voltail", password = "${CLICKHOUSE_PASSWORD}" }
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::client::{self, Auth, ClientOptions, HttpClient};
use super::http::{validate_common, validate_level, validate_url};
use super::{Sink, SinkError, SinkErrorKind};
use crate::batch::{escape_json, Batch, Encoder, Event, FileKey};
use crate::config::{Compression, Dur};

/// The table the sink writes, as `CREATE TABLE` (replace `logs` with the configured name).
///
/// `timestamp` is the collection time in seconds and `timestamp_ns` in nanoseconds since the
/// epoch; `id` is the stable event id (file fingerprint + offset); `tags` holds the path tags.
/// On ClickHouse 20.5+ `timestamp` may be `DateTime64(9)` fed from `timestamp_ns` by a
/// `DEFAULT`, and `tags` a `Map(String, String)` via a materialized view; this form works on
/// every version from 18.16 on.
///
/// No `PARTITION BY` on a time: `ReplacingMergeTree`'s background merges never cross
/// partitions, and an event read again after a restart carries a new collection time, so with
/// daily partitions one sent again across midnight would stay twice for every query without
/// `FINAL`. Keep retention with `TTL timestamp + INTERVAL 30 DAY` (ClickHouse 19.6+). Tables
/// partitioned by time for cheap `DROP PARTITION` work too, at the price of that rare
/// duplicate outside `FINAL` queries (`LIMIT 1 BY id` hides it).
pub const TABLE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS logs (
    timestamp DateTime,
    timestamp_ns UInt64,
    id String,
    source String,
    file String,
    offset UInt64,
    message String,
    tags Nested(key String, value String)
) ENGINE = ReplacingMergeTree
ORDER BY (source, id)";

/// `[sink] type = "clickhouse"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseSinkConfig {
    /// The HTTP interface, e.g. `http://clickhouse:8123`.
    pub endpoint: String,
    /// Database.
    #[serde(default = "defaults::database")]
    pub database: String,
    /// Table (see [`TABLE_SCHEMA`]).
    #[serde(default = "defaults::table")]
    pub table: String,
    /// `gzip` (default, every version), `zstd` (ClickHouse 21+) or `none`.
    #[serde(default = "defaults::compression")]
    pub compression: Compression,
    /// gzip (0..=9) or zstd (-7..=22) level.
    #[serde(default = "defaults::compression_level")]
    pub compression_level: i32,
    /// Authentication (ClickHouse takes HTTP basic auth).
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
    pub fn database() -> String {
        "default".into()
    }
    pub fn table() -> String {
        "logs".into()
    }
    pub fn compression() -> Compression {
        Compression::Gzip
    }
    pub fn compression_level() -> i32 {
        3
    }
    pub fn timeout() -> Dur {
        Dur(Duration::from_secs(30))
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl ClickHouseSinkConfig {
    /// The compression the batch stage applies (gzip is done here).
    pub fn stage_compression(&self) -> (Compression, i32) {
        match self.compression {
            Compression::Zstd => (Compression::Zstd, self.compression_level),
            _ => (Compression::None, 0),
        }
    }

    /// Checks what serde can't; errors are `(key, message)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        validate_url("endpoint", &self.endpoint)?;
        validate_level(self.compression, self.compression_level)?;
        validate_common(self.auth.as_ref(), self.timeout)?;
        if !is_identifier(&self.database) {
            return Err((
                "database",
                format!("{:?} is not an identifier", self.database),
            ));
        }
        if !is_identifier(&self.table) {
            return Err(("table", format!("{:?} is not an identifier", self.table)));
        }
        Ok(())
    }
}

/// One `JSONEachRow` object per event, with the columns of [`TABLE_SCHEMA`].
#[derive(Debug, Default)]
pub struct JsonEachRowEncoder {
    /// `"source":..,"file":..,` and `"tags.key":[..],"tags.value":[..]}` of the last file seen
    /// (events of one file come in runs).
    last: Option<(FileKey, Vec<u8>, Vec<u8>)>,
}

impl Encoder for JsonEachRowEncoder {
    fn encode(&mut self, ev: &Event<'_>, out: &mut Vec<u8>) {
        if self.last.as_ref().map(|l| l.0) != Some(ev.meta.key) {
            let m = ev.meta;
            let mut mid = Vec::with_capacity(64 + m.path.len());
            mid.extend_from_slice(b"\"source\":\"");
            escape_json(m.source.as_bytes(), &mut mid);
            mid.extend_from_slice(b"\",\"file\":\"");
            escape_json(m.path.as_bytes(), &mut mid);
            mid.extend_from_slice(b"\",");
            let mut tail = Vec::with_capacity(64);
            tail.extend_from_slice(b",\"tags.key\":[");
            for (i, (k, _)) in m.tags.iter().enumerate() {
                if i > 0 {
                    tail.push(b',');
                }
                tail.push(b'"');
                escape_json(k.as_bytes(), &mut tail);
                tail.push(b'"');
            }
            tail.extend_from_slice(b"],\"tags.value\":[");
            for (i, (_, v)) in m.tags.iter().enumerate() {
                if i > 0 {
                    tail.push(b',');
                }
                tail.push(b'"');
                escape_json(v.as_bytes(), &mut tail);
                tail.push(b'"');
            }
            tail.extend_from_slice(b"]}\n");
            self.last = Some((m.key, mid, tail));
        }
        let (_, mid, tail) = self.last.as_ref().expect("set above");
        let ns = ev.timestamp.unix_nanos;
        let mut num = itoa::Buffer::new();
        out.extend_from_slice(b"{\"timestamp\":");
        out.extend_from_slice(num.format((ns / 1_000_000_000) as u64).as_bytes());
        out.extend_from_slice(b",\"timestamp_ns\":");
        out.extend_from_slice(num.format(ns as u64).as_bytes());
        out.extend_from_slice(b",\"id\":\"");
        super::http::push_event_id(ev.meta.fingerprint, ev.offset, out);
        out.extend_from_slice(b"\",");
        out.extend_from_slice(mid);
        out.extend_from_slice(b"\"offset\":");
        out.extend_from_slice(num.format(ev.offset).as_bytes());
        out.extend_from_slice(b",\"message\":\"");
        escape_json(ev.message, out);
        out.push(b'"');
        out.extend_from_slice(tail);
    }
}

/// ClickHouse error codes that fail the same way on every retry.
const PERMANENT_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    16,  // NO_SUCH_COLUMN_IN_TABLE
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    60,  // UNKNOWN_TABLE
    62,  // SYNTAX_ERROR
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    81,  // UNKNOWN_DATABASE
    89,  // UNKNOWN_COMPRESSION_METHOD (zstd on a server before 21.x)
    115, // UNKNOWN_SETTING
    117, // INCORRECT_DATA
    192, // UNKNOWN_USER
    193, // WRONG_PASSWORD
    194, // REQUIRED_PASSWORD
    195, // IP_ADDRESS_NOT_ALLOWED
    497, // ACCESS_DENIED
    516, // AUTHENTICATION_FAILED
];

/// The `Code: N` of a ClickHouse error body.
fn error_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + 6..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Refines the generic HTTP classification with ClickHouse's error code.
pub fn classify(mut e: SinkError) -> SinkError {
    if let Some(code) = error_code(&e.message) {
        if PERMANENT_CODES.contains(&code) {
            e.kind = SinkErrorKind::Permanent;
            e.reason = "rejected";
            e.retry_after = None;
        }
    }
    e
}

/// Inserts batches over HTTP.
#[derive(Debug)]
pub struct ClickHouseSink {
    url: String,
    compression: Compression,
    level: i32,
    client: HttpClient,
}

impl ClickHouseSink {
    /// Builds the client.
    pub fn new(cfg: &ClickHouseSinkConfig) -> Result<ClickHouseSink, SinkError> {
        let query = format!(
            "INSERT INTO {}.{} FORMAT JSONEachRow",
            cfg.database, cfg.table
        );
        let url = format!(
            "{}/?input_format_skip_unknown_fields=1&query={}",
            cfg.endpoint.trim_end_matches('/'),
            query.replace(' ', "%20")
        );
        let opts = ClientOptions {
            timeout: cfg.timeout.0,
            headers: Vec::new(),
            auth: cfg.auth.clone(),
            ca_file: cfg.ca_file.clone(),
        };
        Ok(ClickHouseSink {
            url,
            compression: cfg.compression,
            level: cfg.compression_level,
            client: HttpClient::new("clickhouse", &opts)?,
        })
    }
}

impl Sink for ClickHouseSink {
    fn name(&self) -> &'static str {
        "clickhouse"
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
        match self
            .client
            .post(&self.url, &headers, &body, batch.raw_bytes)
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = classify(e);
                tracing::debug!(reason = e.reason, error = %e, "clickhouse insert failed");
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{FileMeta, Timestamp};
    use std::sync::Arc;

    #[test]
    fn rows_are_json_with_every_column() {
        let m = FileMeta::new(
            3,
            Arc::from("s"),
            "/a\"b".into(),
            vec![("ns".into(), "x".into()), ("pod".into(), "p\\1".into())],
            0x10,
        );
        let ts = Timestamp::at(std::time::UNIX_EPOCH + Duration::from_millis(1_500));
        let mut enc = JsonEachRowEncoder::default();
        let mut out = Vec::new();
        for off in [0, 17] {
            enc.encode(
                &Event {
                    message: b"m\t1",
                    offset: off,
                    meta: &m,
                    timestamp: &ts,
                },
                &mut out,
            );
        }
        let rows: Vec<serde_json::Value> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("json"))
            .collect();
        assert_eq!(rows.len(), 2);
        let r = &rows[1];
        assert_eq!(r["timestamp"], 1);
        assert_eq!(r["timestamp_ns"], 1_500_000_000u64);
        assert_eq!(r["id"], "0000000000000010-11");
        assert_eq!(r["file"], "/a\"b");
        assert_eq!(r["offset"], 17);
        assert_eq!(r["message"], "m\t1");
        assert_eq!(r["tags.key"], serde_json::json!(["ns", "pod"]));
        assert_eq!(r["tags.value"], serde_json::json!(["x", "p\\1"]));
    }

    #[test]
    fn clickhouse_codes_refine_500s() {
        let e = client::status_error(
            "clickhouse",
            500,
            b"Code: 60, e.displayText() = DB::Exception: Table default.nope doesn't exist.",
            None,
        );
        assert_eq!(classify(e).kind, SinkErrorKind::Permanent);
        let e = client::status_error("clickhouse", 500, b"Code: 252, Too many parts", None);
        assert_eq!(classify(e).kind, SinkErrorKind::Transient);
        assert_eq!(error_code("x Code: 81, y"), Some(81));
    }
}
