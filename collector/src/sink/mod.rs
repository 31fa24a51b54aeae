//! Sinks: where batches go, and what "acknowledged" means for each.
//!
//! A [`Sink`] takes batches in order from the uploader (each of its `concurrency` lanes is one
//! instance, see [`build_lanes`]). `send` returning `Ok` is the
//! acknowledgement (the batch is written, or the backend answered 2xx); `commit` makes
//! everything sent so far durable and returns a *cursor* that the uploader stores in the same
//! checkpoint write as the file offsets. On start, `recover` gets that cursor back, so a sink that
//! can roll back (the file sink truncates its segment) makes delivery exactly-once across a crash.
//!
//! Each sink also chooses the [`Encoder`] the readers use to write events into batches, and the
//! whole-batch compression (`SinkConfig::compression`); the sink itself does neither.

pub mod clickhouse;
pub mod client;
pub mod elasticsearch;
pub mod file;
pub mod http;
pub mod kafka;
pub mod loki;
pub mod sls;

use crate::batch::{Batch, Encoder, NdjsonEncoder};
use crate::config::{Config, SinkConfig};

/// `concurrency` of the network sinks when the config doesn't say: enough to hide a round
/// trip behind the next request without piling load on the backend.
pub(crate) fn default_concurrency() -> usize {
    4
}

/// Why a batch was not delivered.
#[derive(Debug, thiserror::Error)]
#[error("{sink} sink: {message}")]
pub struct SinkError {
    /// The sink type.
    pub sink: &'static str,
    /// Whether trying again can succeed.
    pub kind: SinkErrorKind,
    /// Short label for the `reason` metric label (bounded set: `io`, `timeout`, `http_5xx`, ...).
    pub reason: &'static str,
    /// What went wrong, with the backend's own words where it gave any.
    pub message: String,
    /// How long the backend asked us to wait (`Retry-After`), for transient errors.
    pub retry_after: Option<std::time::Duration>,
}

/// Transient errors are retried by the uploader with exponential backoff and jitter (honouring
/// `retry_after`); permanent ones are logged, counted and written to the dead-letter directory
/// in `data_dir`, and the pipeline moves on. Sinks only classify; they never retry or sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkErrorKind {
    /// Timeouts, connection errors, 5xx, 429, a full disk.
    Transient,
    /// The backend refuses this batch and will refuse it again.
    Permanent,
}

/// A destination for batches.
pub trait Sink: Send {
    /// Type name, for logs and metric labels.
    fn name(&self) -> &'static str;
    /// Brings the sink back to the state recorded by `cursor` (from the checkpoint); `None` on a
    /// first start or when the checkpoint was lost. Network sinks, whose acknowledgement is
    /// final, have nothing to roll back.
    fn recover(&mut self, _cursor: Option<&[u8]>) -> Result<(), SinkError> {
        Ok(())
    }
    /// Delivers one batch; `Ok` is the acknowledgement.
    fn send(&mut self, batch: &Batch) -> Result<(), SinkError>;
    /// Makes everything sent so far durable and returns the cursor to checkpoint with it
    /// (empty for sinks whose `send` is already durable).
    fn commit(&mut self) -> Result<Vec<u8>, SinkError> {
        Ok(Vec::new())
    }
    /// Whether `commit` returns a cursor (or has anything to make durable). Such a sink runs
    /// one lane, which the uploader holds while it commits; sinks whose acknowledgement is final
    /// (the network sinks) say false and may run several lanes.
    fn has_cursor(&self) -> bool {
        false
    }
}

/// Builds the sink of `cfg.sink`.
pub fn build(cfg: &Config) -> Result<Box<dyn Sink>, SinkError> {
    match cfg.sink() {
        SinkConfig::File(f) => Ok(Box::new(file::FileSink::open(f)?)),
        SinkConfig::Http(s) => Ok(Box::new(http::HttpSink::new(s)?)),
        SinkConfig::Clickhouse(s) => Ok(Box::new(clickhouse::ClickHouseSink::new(s)?)),
        SinkConfig::Elasticsearch(s) => Ok(Box::new(elasticsearch::ElasticsearchSink::new(s)?)),
        SinkConfig::Loki(s) => Ok(Box::new(loki::LokiSink::new(s)?)),
        SinkConfig::Kafka(s) => kafka::build(s),
        SinkConfig::Sls(s) => Ok(Box::new(sls::SlsSink::new(s)?)),
    }
}

/// The uploader's lanes for `cfg`: [`SinkConfig::lanes`] instances of its sink, each driven by
/// its own sender thread (the first one's cursor is checkpointed).
pub fn build_lanes(cfg: &Config) -> Result<Vec<Box<dyn Sink>>, SinkError> {
    (0..cfg.sink().lanes().max(1)).map(|_| build(cfg)).collect()
}

/// The event encoder the readers use for `cfg`.
pub fn encoder(cfg: &SinkConfig) -> Box<dyn Encoder> {
    match cfg {
        SinkConfig::File(_) => Box::new(NdjsonEncoder),
        SinkConfig::Http(_) => Box::new(http::NdjsonWithIdEncoder),
        SinkConfig::Clickhouse(_) => Box::new(clickhouse::JsonEachRowEncoder::default()),
        SinkConfig::Elasticsearch(s) => Box::new(elasticsearch::BulkEncoder::new(s)),
        SinkConfig::Loki(_) => Box::new(loki::LokiEncoder),
        SinkConfig::Kafka(_) => Box::new(http::NdjsonWithIdEncoder),
        SinkConfig::Sls(_) => Box::new(sls::SlsEncoder),
    }
}
