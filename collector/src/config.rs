//! Configuration: the TOML file, its defaults, and its validation.
//!
//! [`Config::load`] reads and validates a file; every error names the file, the key and the line
//! at fault ([`ConfigError`]). Durations are written as humans write them (`250ms`, `1s`, `5m`)
//! and parsed by [`Dur`]. Validation compiles every glob and regex once, here, so that nothing
//! downstream can fail on a bad pattern at run time; the compiled forms live in the modules that
//! use them (discovery, tags, framing), which take the validated strings.
//!
//! This module does not decide behaviour: it only describes it.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Everything that can be wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema (the message names line and key).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line, column and the offending text.
        message: String,
    },
    /// A value parsed but makes no sense.
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the value at fault (0 when the key is missing altogether).
        line: usize,
        /// Dotted key, e.g. `sources[0].path_tags`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// A duration written as `250ms`, `1s`, `5m`, `1h 30m`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl fmt::Debug for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim()).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}); write it like \"250ms\", \"1s\" or \"5m\""
            ))
        })
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// Where reading starts in files that exist at the very first start (no checkpoint yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    /// Read them whole.
    Beginning,
    /// Skip what they hold; ship only what is appended from now on.
    End,
}

/// Which read backend tails the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReaderKind {
    /// io_uring on network and FUSE filesystems, pread on local disks.
    Auto,
    /// Always io_uring (falls back to pread, with a log line, where the kernel refuses it).
    IoUring,
    /// Always plain `pread`/`statx` syscalls.
    Pread,
}

/// Whether the eBPF write probe runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeMode {
    /// Try it; fall back to polling with one log line saying why.
    Auto,
    /// Require it: start-up fails with the reason when it cannot run.
    On,
    /// Never load it.
    Off,
}

/// Payload compression of a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// One zstd frame per batch.
    Zstd,
    /// gzip (network sinks that can't take zstd).
    Gzip,
    /// Plain NDJSON.
    None,
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Checkpoint, lock and dead letters live here; put it on the shared volume.
    #[serde(default = "defaults::data_dir")]
    pub data_dir: PathBuf,
    /// How often the checkpoint is made durable.
    #[serde(default = "defaults::checkpoint_interval")]
    pub checkpoint_interval: Dur,
    /// On SIGTERM, how long to wait for in-flight data to be delivered.
    #[serde(default = "defaults::shutdown_timeout")]
    pub shutdown_timeout: Dur,
    /// Read backend.
    #[serde(default = "defaults::reader")]
    pub reader: ReaderKind,
    /// The eBPF write probe.
    #[serde(default = "defaults::probe")]
    pub probe: ProbeMode,
    /// Safety poll interval while the probe runs (it sees only local writers).
    #[serde(default = "defaults::probe_poll_interval")]
    pub probe_poll_interval: Dur,
    /// How long the probe gathers write events before it hands them to the reader: the
    /// reader wakes at most once per window under a steady write load, and a local write is
    /// read up to this much later (a write after a quiet spell is read at once).
    #[serde(default = "defaults::probe_batch_window")]
    pub probe_batch_window: Dur,
    /// Tag each file's events with the cgroup (`writer_cgroup`) and container id
    /// (`container_id`) of the process on this node that last wrote it, as the probe saw it.
    #[serde(default)]
    pub probe_writer_tags: bool,
    /// This replica's share of the pod directories, `"<ordinal>/<count>"`; absent means all.
    #[serde(default)]
    pub shard: Option<Spanned<String>>,
    /// Metrics and health endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Batching between the readers and the sink.
    #[serde(default)]
    pub batch: BatchConfig,
    /// What to collect.
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Where to ship.
    pub sink: Option<Spanned<SinkConfig>>,
}

/// `[metrics]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` serving `GET /metrics`, `GET /health` and `GET /ready`; empty disables it.
    #[serde(default = "defaults::metrics_address")]
    pub address: Spanned<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            address: Spanned::new(0..0, defaults::metrics_address().into_inner()),
        }
    }
}

/// `[batch]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// A batch is closed when its encoded events reach this many bytes.
    #[serde(default = "defaults::batch_max_bytes")]
    pub max_bytes: usize,
    /// ... or this many events.
    #[serde(default = "defaults::batch_max_events")]
    pub max_events: usize,
    /// ... or when its first event has waited this long.
    #[serde(default = "defaults::batch_linger")]
    pub linger: Dur,
    /// Batches that may wait between stages; when full, readers pause (the files are the buffer).
    #[serde(default = "defaults::queue_batches")]
    pub queue_batches: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_bytes: defaults::batch_max_bytes(),
            max_events: defaults::batch_max_events(),
            linger: defaults::batch_linger(),
            queue_batches: defaults::queue_batches(),
        }
    }
}

/// One `[[sources]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Name shipped with every event (`source`).
    pub name: Spanned<String>,
    /// Absolute globs; `**` crosses directories.
    pub include: Vec<Spanned<String>>,
    /// Globs of paths never collected.
    #[serde(default)]
    pub exclude: Vec<Spanned<String>>,
    /// Regex over the path; each named group becomes a tag.
    #[serde(default)]
    pub path_tags: Option<Spanned<String>>,
    /// For files present at the very first start.
    #[serde(default = "defaults::start_at")]
    pub start_at: StartAt,
    /// How often growing files are polled.
    #[serde(default = "defaults::poll_interval")]
    pub poll_interval: Dur,
    /// Idle files back off up to this interval.
    #[serde(default = "defaults::max_poll_interval")]
    pub max_poll_interval: Dur,
    /// How often the globs are evaluated again.
    #[serde(default = "defaults::discover_interval")]
    pub discover_interval: Dur,
    /// Longer lines are split (never dropped).
    #[serde(default = "defaults::max_line_bytes")]
    pub max_line_bytes: usize,
    /// A last line without its newline is shipped after waiting this long.
    #[serde(default = "defaults::flush_partial_after")]
    pub flush_partial_after: Dur,
    /// A rotated-away or deleted file is released after being idle at its end this long.
    #[serde(default = "defaults::rotate_wait")]
    pub rotate_wait: Dur,
    /// Multiline events.
    #[serde(default)]
    pub multiline: Option<MultilineConfig>,
    /// Character encoding of the files (any WHATWG label: `gbk`, `utf-16le`, ...).
    #[serde(default)]
    pub encoding: Option<Spanned<String>>,
}

/// `[sources.multiline]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MultilineConfig {
    /// A line matching this starts an event; other lines join the previous one.
    pub start_pattern: Spanned<String>,
}

/// The highest `concurrency` a network sink takes.
pub const MAX_CONCURRENCY: usize = 64;

/// `[sink]`: where batches go.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    /// Segment files in a directory (the embedded default).
    File(FileSinkConfig),
    /// NDJSON POSTed to a URL.
    Http(crate::sink::http::HttpSinkConfig),
    /// `INSERT ... FORMAT JSONEachRow` over ClickHouse's HTTP interface.
    Clickhouse(crate::sink::clickhouse::ClickHouseSinkConfig),
    /// The `_bulk` API of Elasticsearch or OpenSearch.
    Elasticsearch(crate::sink::elasticsearch::ElasticsearchSinkConfig),
    /// Grafana Loki's push API.
    Loki(crate::sink::loki::LokiSinkConfig),
    /// One Kafka message per event.
    Kafka(crate::sink::kafka::KafkaSinkConfig),
    /// Alibaba Cloud Log Service `PutLogs`.
    Sls(crate::sink::sls::SlsSinkConfig),
}

impl SinkConfig {
    /// The compression the batch stage applies for this sink.
    pub fn compression(&self) -> (Compression, i32) {
        match self {
            SinkConfig::File(f) => (f.compression, f.compression_level),
            SinkConfig::Http(s) => s.stage_compression(),
            SinkConfig::Clickhouse(s) => s.stage_compression(),
            SinkConfig::Elasticsearch(s) => s.stage_compression(),
            SinkConfig::Loki(s) => s.stage_compression(),
            SinkConfig::Kafka(s) => s.stage_compression(),
            SinkConfig::Sls(s) => s.stage_compression(),
        }
    }

    /// `concurrency`: how many batches may be in flight to the backend at once.
    pub fn concurrency(&self) -> usize {
        match self {
            SinkConfig::File(f) => f.concurrency,
            SinkConfig::Http(s) => s.concurrency,
            SinkConfig::Clickhouse(s) => s.concurrency,
            SinkConfig::Elasticsearch(s) => s.concurrency,
            SinkConfig::Loki(s) => s.concurrency,
            SinkConfig::Kafka(s) => s.concurrency,
            SinkConfig::Sls(s) => s.concurrency,
        }
    }

    /// How many sink instances (lanes) the uploader drives in parallel. Kafka runs one: its
    /// producer pipelines inside librdkafka, where `concurrency` bounds the produce requests
    /// in flight per broker instead (`max.in.flight.requests.per.connection`).
    pub fn lanes(&self) -> usize {
        match self {
            SinkConfig::Kafka(_) => 1,
            other => other.concurrency(),
        }
    }
}

/// `[sink] type = "file"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// Directory of segment files.
    pub path: PathBuf,
    /// `zstd` or `none`.
    #[serde(default = "defaults::compression")]
    pub compression: Compression,
    /// zstd level.
    #[serde(default = "defaults::compression_level")]
    pub compression_level: i32,
    /// A segment is closed and the next one started past this size.
    #[serde(default = "defaults::segment_max_bytes")]
    pub segment_max_bytes: u64,
    /// Batches in flight: always 1, the segments are written in order with one cursor.
    #[serde(default = "defaults::file_concurrency")]
    pub concurrency: usize,
}

mod defaults {
    use super::*;
    pub fn data_dir() -> PathBuf {
        PathBuf::from("/var/lib/voltail")
    }
    pub fn checkpoint_interval() -> Dur {
        Dur(Duration::from_secs(1))
    }
    pub fn shutdown_timeout() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn reader() -> ReaderKind {
        ReaderKind::Auto
    }
    pub fn probe() -> ProbeMode {
        ProbeMode::Auto
    }
    pub fn probe_poll_interval() -> Dur {
        Dur(Duration::from_secs(10))
    }
    pub fn probe_batch_window() -> Dur {
        Dur(voltail_ebpf::DEFAULT_BATCH_WINDOW)
    }
    pub fn metrics_address() -> Spanned<String> {
        Spanned::new(0..0, "0.0.0.0:9464".to_string())
    }
    pub fn batch_max_bytes() -> usize {
        1 << 20
    }
    pub fn batch_max_events() -> usize {
        8192
    }
    pub fn batch_linger() -> Dur {
        Dur(Duration::from_millis(100))
    }
    pub fn queue_batches() -> usize {
        8
    }
    pub fn start_at() -> StartAt {
        StartAt::Beginning
    }
    pub fn poll_interval() -> Dur {
        Dur(Duration::from_secs(1))
    }
    pub fn max_poll_interval() -> Dur {
        Dur(Duration::from_secs(10))
    }
    pub fn discover_interval() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn max_line_bytes() -> usize {
        512 * 1024
    }
    pub fn flush_partial_after() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn rotate_wait() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn compression() -> Compression {
        Compression::Zstd
    }
    pub fn compression_level() -> i32 {
        1
    }
    pub fn segment_max_bytes() -> u64 {
        128 << 20
    }
    pub fn file_concurrency() -> usize {
        1
    }
}

/// A shard assignment `ordinal/count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This replica, `0..count`.
    pub ordinal: u32,
    /// Replicas in all.
    pub count: u32,
}

impl Shard {
    /// Parses `"1/3"`; an ordinal may also be given as a StatefulSet pod name (`voltail-1`).
    pub fn parse(s: &str) -> Result<Shard, String> {
        let (o, c) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not \"<ordinal>/<count>\""))?;
        let o = o.trim();
        let o = o.rsplit('-').next().unwrap_or(o);
        let ordinal: u32 = o
            .parse()
            .map_err(|_| format!("ordinal {o:?} is not a number"))?;
        let count: u32 = c
            .trim()
            .parse()
            .map_err(|_| format!("count {c:?} is not a number"))?;
        if count == 0 || ordinal >= count {
            return Err(format!("ordinal {ordinal} is not in 0..{count}"));
        }
        Ok(Shard { ordinal, count })
    }
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates `text`; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let text = expand_env(text);
        let cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate(path, &text)?;
        Ok(cfg)
    }

    /// The configured sink (validated to be present).
    pub fn sink(&self) -> &SinkConfig {
        self.sink
            .as_ref()
            .map(|s| s.get_ref())
            .expect("validate() checked that [sink] exists")
    }

    /// The parsed shard, if any (validated).
    pub fn shard(&self) -> Option<Shard> {
        self.shard
            .as_ref()
            .and_then(|s| Shard::parse(s.get_ref()).ok())
    }

    /// The metrics address, or `None` when disabled (validated).
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        let a = self.metrics.address.get_ref().trim();
        if a.is_empty() {
            None
        } else {
            a.parse().ok()
        }
    }

    /// The resolved configuration (defaults filled in) as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    fn validate(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let bad =
            |span: std::ops::Range<usize>, key: String, message: String| ConfigError::Invalid {
                path: path.to_path_buf(),
                line: if span.end == 0 {
                    0
                } else {
                    line_of(text, span.start)
                },
                key,
                message,
            };
        if self.sink.is_none() {
            return Err(bad(0..0, "sink".into(), "missing [sink] table".into()));
        }
        if self.sources.is_empty() {
            return Err(bad(
                0..0,
                "sources".into(),
                "no [[sources]]: nothing to collect".into(),
            ));
        }
        let addr = &self.metrics.address;
        if !addr.get_ref().trim().is_empty() && addr.get_ref().trim().parse::<SocketAddr>().is_err()
        {
            return Err(bad(
                addr.span(),
                "metrics.address".into(),
                format!(
                    "{:?} is not host:port (e.g. \"0.0.0.0:9464\")",
                    addr.get_ref()
                ),
            ));
        }
        if let Some(shard) = &self.shard {
            Shard::parse(shard.get_ref()).map_err(|m| bad(shard.span(), "shard".into(), m))?;
        }
        let at = |table: &str, nth: usize, key: &str, message: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: key_line(text, table, nth, key),
            key: match table {
                "" => key.to_string(),
                "[[sources]]" => format!("sources[{nth}].{key}"),
                t => format!("{}.{key}", t.trim_matches(|c| c == '[' || c == ']')),
            },
            message: message.to_string(),
        };
        if self.probe_writer_tags && self.probe == ProbeMode::Off {
            return Err(at(
                "",
                0,
                "probe_writer_tags",
                "needs the probe: probe = \"auto\" or \"on\"",
            ));
        }
        if self.probe_batch_window.0 > Duration::from_millis(100) {
            return Err(at(
                "",
                0,
                "probe_batch_window",
                "must be at most 100ms (it adds to the latency of every local write)",
            ));
        }
        if self.checkpoint_interval.0.is_zero() {
            return Err(at("", 0, "checkpoint_interval", "must be above zero"));
        }
        let b = &self.batch;
        if b.max_bytes < 1024 || b.max_bytes > 256 << 20 {
            return Err(at("[batch]", 0, "max_bytes", "must be in 1024..=268435456"));
        }
        if b.max_events == 0 {
            return Err(at("[batch]", 0, "max_events", "must be above zero"));
        }
        if b.queue_batches == 0 {
            return Err(at("[batch]", 0, "queue_batches", "must be above zero"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            let k = |f: &str| format!("sources[{i}].{f}");
            let name = s.name.get_ref();
            if name.is_empty() || !names.insert(name.clone()) {
                return Err(bad(
                    s.name.span(),
                    k("name"),
                    format!("{name:?} is empty or used twice"),
                ));
            }
            if s.include.is_empty() {
                return Err(bad(
                    s.name.span(),
                    k("include"),
                    "needs at least one glob".into(),
                ));
            }
            for g in &s.include {
                if !g.get_ref().starts_with('/') {
                    return Err(bad(
                        g.span(),
                        k("include"),
                        format!("{:?} is not an absolute path", g.get_ref()),
                    ));
                }
                globset::Glob::new(g.get_ref())
                    .map_err(|e| bad(g.span(), k("include"), format!("bad glob: {e}")))?;
            }
            for g in &s.exclude {
                globset::Glob::new(g.get_ref())
                    .map_err(|e| bad(g.span(), k("exclude"), format!("bad glob: {e}")))?;
            }
            if let Some(re) = &s.path_tags {
                let compiled = regex::Regex::new(re.get_ref())
                    .map_err(|e| bad(re.span(), k("path_tags"), format!("bad regex: {e}")))?;
                if compiled.capture_names().flatten().next().is_none() {
                    return Err(bad(
                        re.span(),
                        k("path_tags"),
                        "has no named group (?P<name>...)".into(),
                    ));
                }
            }
            if let Some(m) = &s.multiline {
                let p = &m.start_pattern;
                regex::bytes::Regex::new(p.get_ref()).map_err(|e| {
                    bad(
                        p.span(),
                        k("multiline.start_pattern"),
                        format!("bad regex: {e}"),
                    )
                })?;
            }
            if let Some(enc) = &s.encoding {
                let (span, label) = (enc.span(), enc.get_ref());
                match encoding_rs::Encoding::for_label(label.as_bytes()) {
                    None => {
                        return Err(bad(
                            span,
                            k("encoding"),
                            format!("unknown encoding {label:?}"),
                        ))
                    }
                    // Lines are cut at 0x0A bytes, which UTF-16 does not keep.
                    Some(e) if !e.is_ascii_compatible() => {
                        let m = format!("{} is not ASCII-compatible; not supported", e.name());
                        return Err(bad(span, k("encoding"), m));
                    }
                    Some(_) => {}
                }
            }
            if s.poll_interval.0.is_zero() || s.max_poll_interval < s.poll_interval {
                let m = "must be above zero and not above max_poll_interval";
                return Err(at("[[sources]]", i, "poll_interval", m));
            }
            if s.max_line_bytes < 64 || s.max_line_bytes > 64 << 20 {
                return Err(at(
                    "[[sources]]",
                    i,
                    "max_line_bytes",
                    "must be in 64..=67108864",
                ));
            }
        }
        let sink_bad = |key: &str, message: String| {
            let span = self.sink.as_ref().map(|s| s.span()).unwrap_or(0..0);
            bad(span, format!("sink.{key}"), message)
        };
        let (most, why) = match self.sink() {
            SinkConfig::File(_) => (1, "the file sink writes its segments in order"),
            SinkConfig::Kafka(_) => (5, "librdkafka's limit with enable.idempotence"),
            _ => (MAX_CONCURRENCY, "higher is not useful"),
        };
        let c = self.sink().concurrency();
        if c == 0 || c > most {
            return Err(sink_bad(
                "concurrency",
                format!("must be in 1..={most} ({why})"),
            ));
        }
        match self.sink() {
            SinkConfig::Http(s) => s.validate().map_err(|(k, m)| sink_bad(k, m))?,
            SinkConfig::Clickhouse(s) => s.validate().map_err(|(k, m)| sink_bad(k, m))?,
            SinkConfig::Elasticsearch(s) => s.validate().map_err(|(k, m)| sink_bad(k, m))?,
            SinkConfig::Loki(s) => s.validate().map_err(|(k, m)| sink_bad(k, m))?,
            SinkConfig::Kafka(s) => s.validate().map_err(|(k, m)| sink_bad(k, m))?,
            SinkConfig::Sls(s) => s.validate().map_err(|(k, m)| sink_bad(k, m))?,
            SinkConfig::File(f) => {
                if f.compression == Compression::Gzip {
                    return Err(at(
                        "[sink]",
                        0,
                        "compression",
                        "the file sink writes zstd or none",
                    ));
                }
                if !(-7..=22).contains(&f.compression_level) {
                    return Err(at(
                        "[sink]",
                        0,
                        "compression_level",
                        "zstd levels are -7..=22",
                    ));
                }
                if f.segment_max_bytes < 4096 {
                    return Err(at(
                        "[sink]",
                        0,
                        "segment_max_bytes",
                        "must be at least 4096",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// 1-based line of `key = ...` inside the `nth` occurrence of table header `table` (or at the
/// top level when `table` is empty); the header's own line when the key is not written there
/// (the default is at fault), 0 when neither is found.
fn key_line(text: &str, table: &str, nth: usize, key: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let start = if table.is_empty() {
        Some(0)
    } else {
        lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.trim() == table)
            .nth(nth)
            .map(|(i, _)| i)
    };
    let Some(start) = start else { return 0 };
    let body = if table.is_empty() { start } else { start + 1 };
    for (i, l) in lines.iter().enumerate().skip(body) {
        let t = l.trim_start();
        if t.starts_with('[') {
            break;
        }
        if let Some(rest) = t.strip_prefix(key) {
            if rest.trim_start().starts_with('=') {
                return i + 1;
            }
        }
    }
    if table.is_empty() {
        0
    } else {
        start + 1
    }
}

/// 1-based line number of byte `pos` in `text`.
fn line_of(text: &str, pos: usize) -> usize {
    text.as_bytes()[..pos.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Replaces `${NAME}` with the environment variable `NAME` (left as is when unset), so that
/// credentials and the pod's own name can come from the environment.
fn expand_env(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end)
                if after[..end]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                let name = &after[..end];
                match std::env::var(name) {
                    Ok(v) => out.push_str(&v),
                    Err(_) => out.push_str(&rest[start..start + 3 + end]),
                }
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("${");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
data_dir = "/tmp/voltail"
[metrics]
address = "127.0.0.1:0"
[[sources]]
name = "nginx"
include = ["/var/log/nginx/*/access.log"]
exclude = ["**/*.gz"]
path_tags = '^/var/log/(?P<app>[^/]+)/(?P<namespace>[^_]+)_(?P<pod>[^_]+)_'
poll_interval = "250ms"
[sink]
type = "file"
path = "/tmp/out"
"#;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), t)
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.sources[0].poll_interval.0, Duration::from_millis(250));
        assert_eq!(c.sources[0].discover_interval.0, Duration::from_secs(5));
        assert_eq!(c.sources[0].max_line_bytes, 524288);
        assert_eq!(c.sink().compression(), (Compression::Zstd, 1));
        let again = parse(&c.to_toml()).expect("resolved config parses again");
        assert_eq!(again.sources[0].poll_interval, c.sources[0].poll_interval);
    }

    /// Regression (fuzz `config_parse`): toml 0.8's writer counted a run of quotes in a `u8`
    /// and panicked (or, in release, chose a quoting that does not parse) at 256 in a row.
    #[test]
    fn a_long_run_of_quotes_prints_and_parses_again() {
        let run = "'".repeat(300);
        let t = GOOD.replace(
            "/var/log/nginx/*/access.log",
            &format!("/var/log/{run}/*.log"),
        );
        let c = parse(&t).expect("valid");
        let again = parse(&c.to_toml()).expect("printed config parses again");
        assert_eq!(again.sources[0].include, c.sources[0].include);
    }

    #[test]
    fn bad_regex_names_key_and_line() {
        let t = GOOD.replace("(?P<app>[^/]+)", "(?P<app>[^/]+");
        let e = parse(&t).expect_err("bad regex").to_string();
        assert!(
            e.starts_with("test.toml:9: sources[0].path_tags: bad regex"),
            "{e}"
        );
    }

    #[test]
    fn bad_duration_names_line() {
        let e = parse(&GOOD.replace("250ms", "fast"))
            .expect_err("bad duration")
            .to_string();
        assert!(
            e.contains("line 10") && e.contains("invalid duration"),
            "{e}"
        );
    }

    #[test]
    fn writer_tags_need_the_probe() {
        assert!(
            !parse(GOOD).expect("good").probe_writer_tags,
            "off by default"
        );
        let on = GOOD.replace("[metrics]", "probe_writer_tags = true\n[metrics]");
        assert!(parse(&on).expect("auto probe").probe_writer_tags);
        let e = parse(&on.replace("data_dir", "probe = \"off\"\ndata_dir"))
            .expect_err("tags without the probe")
            .to_string();
        assert!(
            e.starts_with("test.toml:4: probe_writer_tags: needs the probe"),
            "{e}"
        );
    }

    #[test]
    fn the_probe_batch_window_is_bounded() {
        assert_eq!(
            parse(GOOD).expect("good").probe_batch_window.0,
            Duration::from_millis(10)
        );
        let set = GOOD.replace("[metrics]", "probe_batch_window = \"0ms\"\n[metrics]");
        assert!(parse(&set).expect("zero").probe_batch_window.0.is_zero());
        let e = parse(&set.replace("\"0ms\"", "\"1s\""))
            .expect_err("a second")
            .to_string();
        assert!(
            e.starts_with("test.toml:") && e.contains("probe_batch_window: must be at most 100ms"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_is_refused() {
        let e = parse(&GOOD.replace("poll_interval", "pol_interval"))
            .expect_err("typo")
            .to_string();
        assert!(e.contains("unknown field `pol_interval`"), "{e}");
    }

    #[test]
    fn concurrency_defaults_and_bounds() {
        let file = "[sink]\ntype = \"file\"\npath = \"/tmp/out\"\n";
        let c = parse(GOOD).expect("good");
        assert_eq!((c.sink().concurrency(), c.sink().lanes()), (1, 1));
        let e = parse(&GOOD.replace(file, &format!("{file}concurrency = 2\n")))
            .expect_err("file sink in parallel")
            .to_string();
        assert!(e.contains("sink.concurrency: must be in 1..=1"), "{e}");
        let http = "[sink]\ntype = \"http\"\nurl = \"http://x/\"\n";
        let c = parse(&GOOD.replace(file, http)).expect("http");
        assert_eq!((c.sink().concurrency(), c.sink().lanes()), (4, 4));
        let e = parse(&GOOD.replace(file, &format!("{http}concurrency = 0\n")))
            .expect_err("zero")
            .to_string();
        assert!(e.contains("sink.concurrency"), "{e}");
        let kafka = "[sink]\ntype = \"kafka\"\nbrokers = \"k:9092\"\ntopic = \"t\"\n";
        let c = parse(&GOOD.replace(file, kafka)).expect("kafka");
        assert_eq!((c.sink().concurrency(), c.sink().lanes()), (5, 1));
        let e = parse(&GOOD.replace(file, &format!("{kafka}concurrency = 6\n")))
            .expect_err("above librdkafka's limit")
            .to_string();
        assert!(e.contains("enable.idempotence"), "{e}");
    }

    #[test]
    fn missing_sink_and_relative_glob() {
        let e = parse(&GOOD.replace("[sink]\ntype = \"file\"\npath = \"/tmp/out\"\n", ""))
            .expect_err("no sink");
        assert!(e.to_string().contains("missing [sink]"), "{e}");
        let e =
            parse(&GOOD.replace("[\"/var/log/nginx", "[\"var/log/nginx")).expect_err("relative");
        assert!(
            e.to_string().contains("test.toml:7: sources[0].include"),
            "{e}"
        );
    }

    #[test]
    fn bad_address_encoding_and_shard() {
        let e = parse(&GOOD.replace("127.0.0.1:0", "localhost"))
            .expect_err("addr")
            .to_string();
        assert!(e.starts_with("test.toml:4: metrics.address"), "{e}");
        let t = GOOD.replace("poll_interval = \"250ms\"", "encoding = \"klingon\"");
        assert!(parse(&t)
            .expect_err("enc")
            .to_string()
            .contains("unknown encoding"));
        let t = format!("shard = \"3/3\"\n{GOOD}");
        assert!(parse(&t)
            .expect_err("shard")
            .to_string()
            .contains("test.toml:1: shard"));
    }

    #[test]
    fn plain_fields_name_their_line() {
        let t = GOOD.replace(
            "poll_interval = \"250ms\"",
            "poll_interval = \"250ms\"\nmax_line_bytes = 3",
        );
        let e = parse(&t).expect_err("tiny").to_string();
        assert!(
            e.starts_with("test.toml:11: sources[0].max_line_bytes"),
            "{e}"
        );
        let t = format!("{GOOD}compression_level = 99\n");
        let e = parse(&t).expect_err("level").to_string();
        assert!(e.starts_with("test.toml:14: sink.compression_level"), "{e}");
        let t = GOOD.replace("poll_interval = \"250ms\"", "encoding = \"utf-16le\"");
        assert!(parse(&t)
            .expect_err("utf16")
            .to_string()
            .contains("not ASCII-compatible"));
    }

    #[test]
    fn shard_parses_pod_names() {
        assert_eq!(
            Shard::parse("voltail-2/3"),
            Ok(Shard {
                ordinal: 2,
                count: 3
            })
        );
        assert!(Shard::parse("x/3").is_err());
    }

    #[test]
    fn env_is_expanded() {
        std::env::set_var("VOLTAIL_TEST_DIR", "/tmp/from-env");
        assert_eq!(
            expand_env("a ${VOLTAIL_TEST_DIR} ${NOPE_NOT_SET} $x"),
            "a /tmp/from-env ${NOPE_NOT_SET} $x"
        );
    }
}
