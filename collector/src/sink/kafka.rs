//! The `kafka` sink: one Kafka message per event, through librdkafka (`rdkafka`).
//!
//! The value is the event's JSON object (the `http` sink's NDJSON line, with `id`); the header
//! `voltail-id` repeats the stable id for consumers that deduplicate. The topic and the key are
//! templates of the file's tags (`logs-{namespace}`, `{namespace}/{pod}`), so a key keeps one
//! pod's lines in one partition, in order. The producer is idempotent with `acks=all` and
//! compresses record batches itself (zstd by default).
//!
//! Delivery reports are the acknowledgement: `send` queues every message of the batch, waits for
//! all their reports (bounded by `timeout`), and returns `Ok` only when every one succeeded.
//! When some failed with a retryable error (broker down, timeout), the batch is a transient
//! failure and only the failed messages are produced again when the uploader sends the same
//! batch again; errors that repeat the same way (message too large, authorization) are permanent.
//! librdkafka's own retries happen inside `message.timeout.ms`. Built only with the `kafka` cargo
//! feature (default); without it the config still parses and [`build`] says what is missing.
//!
//! ```toml
//! [sink]
//! type = "kafka"
//! brokers = "kafka-0:9092,kafka-1:9092"
//! topic = "logs-{namespace}"
//! key = "{namespace}/{pod}"
//! compression = "zstd"
//! [sink.options]                      # any librdkafka property
//! "security.protocol" = "SASL_SSL"
//! "sasl.mechanism" = "PLAIN"
//! "sasl.username" = "voltail"
//! "sasl.password" = "${KAFKA_PASSWORD}"
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::client::{Secret, Template};
use super::{Sink, SinkError};
use crate::config::{Compression, Dur};

/// `[sink] type = "kafka"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// `host:port,host:port`.
    pub brokers: String,
    /// Topic template (`{tag}`, `{source}`).
    pub topic: String,
    /// Key template; without one, messages have no key (librdkafka's sticky partitioning).
    #[serde(default)]
    pub key: Option<String>,
    /// `zstd` (default), `gzip` or `none`.
    #[serde(default = "defaults::compression")]
    pub compression: Compression,
    /// How long one batch may wait for its delivery reports (also `message.timeout.ms`).
    #[serde(default = "defaults::timeout")]
    pub timeout: Dur,
    /// More librdkafka properties (`security.protocol`, `sasl.username`, ...); values are
    /// secrets. `acks` and `enable.idempotence` can't be overridden.
    #[serde(default)]
    pub options: BTreeMap<String, Secret>,
}

mod defaults {
    use super::*;
    pub fn compression() -> Compression {
        Compression::Zstd
    }
    pub fn timeout() -> Dur {
        Dur(Duration::from_secs(30))
    }
}

impl KafkaSinkConfig {
    /// librdkafka compresses: the batch stage doesn't.
    pub fn stage_compression(&self) -> (Compression, i32) {
        (Compression::None, 0)
    }

    /// Checks what serde can't; errors are `(key, message)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.brokers.trim().is_empty() {
            return Err(("brokers", "needs at least one host:port".into()));
        }
        Template::parse(&self.topic).map_err(|e| ("topic", e))?;
        if self.topic.is_empty() {
            return Err(("topic", "is empty".into()));
        }
        if let Some(k) = &self.key {
            Template::parse(k).map_err(|e| ("key", e))?;
        }
        if self.timeout.0 < Duration::from_secs(1) {
            return Err(("timeout", "must be at least 1s".into()));
        }
        for k in self.options.keys() {
            if matches!(
                k.as_str(),
                "acks" | "enable.idempotence" | "bootstrap.servers" | "compression.type"
            ) {
                return Err((
                    "options",
                    format!("{k:?} is set by the sink (or by its own key)"),
                ));
            }
        }
        Ok(())
    }
}

/// The sink for `cfg`.
pub fn build(cfg: &KafkaSinkConfig) -> Result<Box<dyn Sink>, SinkError> {
    #[cfg(feature = "kafka")]
    {
        Ok(Box::new(imp::KafkaSink::new(cfg)?))
    }
    #[cfg(not(feature = "kafka"))]
    {
        let _ = cfg;
        Err(super::client::config_error(
            "kafka",
            "this voltail was built without the kafka feature".into(),
        ))
    }
}

#[cfg(feature = "kafka")]
pub use imp::{KafkaSink, Reports};

#[cfg(feature = "kafka")]
mod imp {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use rdkafka::config::ClientConfig;
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
    use rdkafka::ClientContext;

    use super::super::client::{SinkMetrics, Template};
    use super::super::{Sink, SinkError, SinkErrorKind};
    use super::KafkaSinkConfig;
    use crate::batch::Batch;
    use crate::config::Compression;

    /// Delivery report of message `index` of the batch of generation `generation`.
    type Report = (u32, Result<(), KafkaError>);

    /// Collects delivery reports; the opaque of a message is `generation << 32 | index`.
    #[derive(Debug, Default)]
    pub struct Reports(Mutex<Vec<(usize, Report)>>);

    impl ClientContext for Reports {}

    impl ProducerContext for Reports {
        type DeliveryOpaque = usize;

        fn delivery(&self, r: &DeliveryResult<'_>, opaque: usize) {
            let res = match r {
                Ok(_) => Ok(()),
                Err((e, _)) => Err(e.clone()),
            };
            let generation = (opaque >> 32) as u32;
            if let Ok(mut v) = self.0.lock() {
                v.push((opaque & 0xffff_ffff, (generation, res)));
            }
        }
    }

    /// Whether a produce error will fail the same way again.
    pub(super) fn is_permanent(e: &KafkaError) -> bool {
        use RDKafkaErrorCode as C;
        match e.rdkafka_error_code() {
            Some(c) => matches!(
                c,
                C::MessageSizeTooLarge
                    | C::InvalidMessage
                    | C::InvalidMessageSize
                    | C::InvalidRecord
                    | C::TopicAuthorizationFailed
                    | C::ClusterAuthorizationFailed
                    | C::InvalidTopic
                    | C::UnsupportedForMessageFormat
                    | C::InvalidArgument
            ),
            None => false,
        }
    }

    /// Produces each event as a message.
    pub struct KafkaSink {
        producer: BaseProducer<Reports>,
        topic: Template,
        key: Option<Template>,
        timeout: Duration,
        metrics: SinkMetrics,
        generation: u32,
        /// Messages of batch `seq` already acknowledged.
        partial: Option<(u64, Vec<bool>)>,
    }

    impl std::fmt::Debug for KafkaSink {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("KafkaSink")
                .field("topic", &self.topic)
                .finish_non_exhaustive()
        }
    }

    fn err(kind: SinkErrorKind, reason: &'static str, message: String) -> SinkError {
        SinkError {
            sink: "kafka",
            kind,
            reason,
            message,
            retry_after: None,
        }
    }

    impl KafkaSink {
        /// Creates the producer (it connects lazily).
        pub fn new(cfg: &KafkaSinkConfig) -> Result<KafkaSink, SinkError> {
            let mut c = ClientConfig::new();
            for (k, v) in &cfg.options {
                c.set(k, &v.0);
            }
            c.set("bootstrap.servers", &cfg.brokers)
                .set("acks", "all")
                .set("enable.idempotence", "true")
                .set(
                    "compression.type",
                    match cfg.compression {
                        Compression::Zstd => "zstd",
                        Compression::Gzip => "gzip",
                        Compression::None => "none",
                    },
                )
                .set("message.timeout.ms", cfg.timeout.0.as_millis().to_string())
                .set("linger.ms", "5");
            let producer: BaseProducer<Reports> =
                c.create_with_context(Reports::default()).map_err(|e| {
                    super::super::client::config_error("kafka", format!("producer: {e}"))
                })?;
            Ok(KafkaSink {
                producer,
                topic: Template::parse(&cfg.topic)
                    .map_err(|e| super::super::client::config_error("kafka", e))?,
                key: cfg
                    .key
                    .as_deref()
                    .map(Template::parse)
                    .transpose()
                    .map_err(|e| super::super::client::config_error("kafka", e))?,
                timeout: cfg.timeout.0,
                metrics: SinkMetrics::new("kafka"),
                generation: 0,
                partial: None,
            })
        }
    }

    impl Sink for KafkaSink {
        fn name(&self) -> &'static str {
            "kafka"
        }

        fn recover(&mut self, _cursor: Option<&[u8]>) -> Result<(), SinkError> {
            Ok(())
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
                    "compressed batch for the kafka sink".into(),
                ));
            }
            let started = Instant::now();
            let _in_flight = self.metrics.in_flight();
            let mut done = match self.partial.take() {
                Some((seq, d)) if seq == batch.seq && d.len() == n => d,
                _ => vec![false; n],
            };
            self.generation = self.generation.wrapping_add(1);
            let generation = self.generation;
            if let Ok(mut v) = self.producer.context().0.lock() {
                v.clear();
            }
            // Topic and key of each file, rendered once.
            let names: Vec<(String, Option<String>)> = batch
                .files
                .iter()
                .map(|m| (self.topic.render(m), self.key.as_ref().map(|k| k.render(m))))
                .collect();
            let deadline = started + self.timeout;
            let todo: Vec<usize> = (0..n).filter(|&i| !done[i]).collect();
            if todo.len() < n {
                self.metrics.items_retried(todo.len());
            }
            let mut bytes = 0;
            for &i in &todo {
                let ev = batch.events[i];
                let m = &batch.files[ev.file as usize];
                let (topic, key) = &names[ev.file as usize];
                let value = batch.event_bytes(i);
                let value = value.strip_suffix(b"\n").unwrap_or(value);
                bytes += value.len();
                let id = m.event_id(ev.offset);
                let opaque = ((generation as usize) << 32) | i;
                let mut record = BaseRecord::with_opaque_to(topic, opaque)
                    .payload(value)
                    .headers(OwnedHeaders::new().insert(Header {
                        key: "voltail-id",
                        value: Some(id.as_str()),
                    }));
                if let Some(k) = key {
                    record = record.key(k.as_str());
                }
                loop {
                    match self.producer.send(record) {
                        Ok(()) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                            record = r;
                            if Instant::now() >= deadline {
                                break;
                            }
                            self.producer.poll(Duration::from_millis(10));
                        }
                        Err((e, _)) => {
                            let kind = if is_permanent(&e) {
                                SinkErrorKind::Permanent
                            } else {
                                SinkErrorKind::Transient
                            };
                            // Wait for what was queued so that its reports are not lost.
                            let _ = self
                                .producer
                                .flush(deadline.saturating_duration_since(Instant::now()));
                            self.collect(generation, &mut done);
                            self.partial = Some((batch.seq, done));
                            let e = err(kind, "produce", format!("producing to {topic}: {e}"));
                            self.metrics
                                .request_done(started.elapsed(), bytes, bytes, Some(&e));
                            return Err(e);
                        }
                    }
                }
            }
            let flushed = self
                .producer
                .flush(deadline.saturating_duration_since(Instant::now()));
            let (failed, first) = self.collect(generation, &mut done);
            let result = if let Some((e, permanent)) = first {
                let kind = if permanent {
                    SinkErrorKind::Permanent
                } else {
                    SinkErrorKind::Transient
                };
                Err(err(
                    kind,
                    if permanent { "rejected" } else { "delivery" },
                    format!("{failed} of {n} messages not delivered: {e}"),
                ))
            } else if done.iter().all(|d| *d) {
                Ok(())
            } else {
                let missing = done.iter().filter(|d| !**d).count();
                Err(err(
                    SinkErrorKind::Transient,
                    "timeout",
                    format!(
                        "{missing} of {n} delivery reports missing after {:?} ({})",
                        self.timeout,
                        flushed.err().map(|e| e.to_string()).unwrap_or_default()
                    ),
                ))
            };
            self.metrics
                .request_done(started.elapsed(), bytes, bytes, result.as_ref().err());
            if result.is_err() {
                self.partial = Some((batch.seq, done));
            }
            result
        }

        fn commit(&mut self) -> Result<Vec<u8>, SinkError> {
            Ok(Vec::new())
        }
    }

    impl KafkaSink {
        /// Applies the reports of `generation` to `done`; returns how many failed and the first
        /// failure (with whether it is permanent).
        fn collect(
            &self,
            generation: u32,
            done: &mut [bool],
        ) -> (usize, Option<(KafkaError, bool)>) {
            let reports = match self.producer.context().0.lock() {
                Ok(mut v) => std::mem::take(&mut *v),
                Err(_) => Vec::new(),
            };
            let mut failed = 0;
            let mut first = None;
            for (i, (g, r)) in reports {
                if g != generation || i >= done.len() {
                    continue;
                }
                match r {
                    Ok(()) => done[i] = true,
                    Err(e) => {
                        failed += 1;
                        let p = is_permanent(&e);
                        if first.as_ref().is_none_or(|(_, fp)| p && !fp) {
                            first = Some((e, p));
                        }
                    }
                }
            }
            (failed, first)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_refuses_overrides_of_delivery_guarantees() {
        let mut c: KafkaSinkConfig =
            toml::from_str("brokers = \"k:9092\"\ntopic = \"logs-{ns}\"\nkey = \"{pod}\"")
                .expect("cfg");
        assert!(c.validate().is_ok());
        c.options.insert("acks".into(), Secret("1".into()));
        assert_eq!(c.validate().expect_err("acks").0, "options");
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn permanent_errors() {
        use super::imp::is_permanent;
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        assert!(is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
        )));
        assert!(!is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageTimedOut
        )));
    }
}
