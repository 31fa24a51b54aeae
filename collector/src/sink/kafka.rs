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
//! batch again (messages still queued in librdkafka are waited for, never produced twice); errors that repeat the same way (message too large, authorization) are permanent.
//! librdkafka's own retries happen inside `message.timeout.ms`. Built only with the `kafka` cargo
//! feature (default); without it the config still parses and [`build`] says what is missing.
//!
//! `concurrency` does not multiply the uploader's lanes here (several producers would each
//! connect to every broker and `flush` cannot wait for one batch's messages only): it bounds the
//! produce requests in flight per broker connection (`max.in.flight.requests.per.connection`,
//! at most 5 with idempotence), which is where librdkafka pipelines.
//!
//! TLS is librdkafka's (OpenSSL: rustls can't be plugged into librdkafka). `tls`, `ca_file` and
//! `client_cert_file`/`client_key_file` are the same keys as the other sinks' and become
//! `security.protocol = ssl` (or the `sasl_ssl` that `options` asks for), `ssl.ca.location`,
//! `ssl.certificate.location` and `ssl.key.location`. The broker's host name is verified.
//!
//! ```toml
//! [sink]
//! type = "kafka"
//! brokers = "kafka-0:9092,kafka-1:9092"
//! topic = "logs-{namespace}"
//! key = "{namespace}/{pod}"
//! compression = "zstd"
//! ca_file = "/etc/voltail/kafka-ca.pem"   # implies TLS
//! concurrency = 5                         # produce requests in flight per broker
//! [sink.options]                      # any librdkafka property
//! "security.protocol" = "sasl_ssl"
//! "sasl.mechanism" = "PLAIN"
//! "sasl.username" = "voltail"
//! "sasl.password" = "${KAFKA_PASSWORD}"
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
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
    /// Produce requests in flight per broker connection (librdkafka's
    /// `max.in.flight.requests.per.connection`, at most 5 with idempotence). The uploader hands
    /// the sink one batch at a time: librdkafka already pipelines the batch's messages.
    #[serde(default = "defaults::concurrency")]
    pub concurrency: usize,
    /// Connect over TLS (`security.protocol = "ssl"`, or `"sasl_ssl"` when `options` sets it);
    /// implied by `ca_file` and `client_cert_file`. Without `ca_file` the system's CAs are trusted.
    #[serde(default)]
    pub tls: bool,
    /// PEM file of CA certificates to trust (librdkafka's `ssl.ca.location`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (`ssl.certificate.location`); needs `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// The client certificate's PEM private key (`ssl.key.location`).
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
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
    pub fn concurrency() -> usize {
        5
    }
}

impl KafkaSinkConfig {
    /// Whether one of the sink's own TLS keys is set.
    fn tls_keys(&self) -> bool {
        self.tls || self.ca_file.is_some() || self.client_cert_file.is_some()
    }

    /// The `options` value of librdkafka property `name`.
    fn option(&self, name: &str) -> Option<&str> {
        self.options.get(name).map(|v| v.0.as_str())
    }

    /// The librdkafka properties the sink's TLS keys stand for (none when they are unset).
    pub fn tls_properties(&self) -> Vec<(&'static str, String)> {
        if !self.tls_keys() {
            return Vec::new();
        }
        let path = |p: &PathBuf| p.display().to_string();
        let mut props = vec![(
            "security.protocol",
            self.option("security.protocol")
                .unwrap_or("ssl")
                .to_string(),
        )];
        if let Some(ca) = &self.ca_file {
            props.push(("ssl.ca.location", path(ca)));
        }
        if let (Some(cert), Some(key)) = (&self.client_cert_file, &self.client_key_file) {
            props.push(("ssl.certificate.location", path(cert)));
            props.push(("ssl.key.location", path(key)));
        }
        props
    }

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
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err((
                "client_cert_file",
                "client_cert_file and client_key_file go together".into(),
            ));
        }
        if let Some(p) = self.option("security.protocol") {
            let tls = p.eq_ignore_ascii_case("ssl") || p.eq_ignore_ascii_case("sasl_ssl");
            if self.tls_keys() && !tls {
                return Err((
                    "options",
                    format!("security.protocol {p:?} is not TLS, but tls, ca_file or client_cert_file is set (use \"ssl\" or \"sasl_ssl\")"),
                ));
            }
        }
        for (key, set, option) in [
            ("ca_file", self.ca_file.is_some(), "ssl.ca.location"),
            (
                "client_cert_file",
                self.client_cert_file.is_some(),
                "ssl.certificate.location",
            ),
            (
                "client_key_file",
                self.client_key_file.is_some(),
                "ssl.key.location",
            ),
        ] {
            if set && self.option(option).is_some() {
                return Err((
                    "options",
                    format!("{option:?} is set by the sink's {key}: set one of them"),
                ));
            }
        }
        if self.concurrency > 5 {
            return Err((
                "concurrency",
                "must be in 1..=5 (librdkafka's limit with enable.idempotence)".into(),
            ));
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

    /// Delivery report: `(batch tag, message index, result)`.
    type Report = (u32, usize, Result<(), KafkaError>);

    /// Collects delivery reports; the opaque of a message is `batch tag << 32 | index`, the tag
    /// being the low 32 bits of `Batch::seq`. Also keeps librdkafka's last client-level error
    /// (a refused TLS handshake, an unreachable broker) for the sink's error messages.
    #[derive(Debug, Default)]
    pub struct Reports(Mutex<Vec<Report>>, Mutex<Option<String>>);

    impl ClientContext for Reports {
        fn error(&self, error: KafkaError, reason: &str) {
            tracing::debug!(error = %error, reason, "librdkafka client error");
            if let Ok(mut last) = self.1.lock() {
                *last = Some(reason.to_string());
            }
        }
    }

    impl ProducerContext for Reports {
        type DeliveryOpaque = usize;

        fn delivery(&self, r: &DeliveryResult<'_>, opaque: usize) {
            let res = match r {
                Ok(_) => Ok(()),
                Err((e, _)) => Err(e.clone()),
            };
            if let Ok(mut v) = self.0.lock() {
                v.push(((opaque >> 32) as u32, opaque & 0xffff_ffff, res));
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

    /// Where each message of the batch being delivered stands.
    #[derive(Debug, Clone, PartialEq)]
    enum State {
        /// Not produced (or its last attempt failed transiently): produce it.
        ToSend,
        /// Queued in librdkafka, no report yet: wait for it, never produce it twice.
        InFlight,
        /// Acknowledged by the brokers.
        Done,
        /// Refused for good.
        Refused(String),
    }

    /// Produces each event as a message.
    pub struct KafkaSink {
        producer: BaseProducer<Reports>,
        topic: Template,
        key: Option<Template>,
        timeout: Duration,
        metrics: SinkMetrics,
        /// `ca_file`, named in errors that look like a failed certificate check.
        ca_file: Option<std::path::PathBuf>,
        /// The batch being delivered (`Batch::seq`) and its messages' states.
        current: Option<(u64, Vec<State>)>,
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
                .set(
                    "max.in.flight.requests.per.connection",
                    cfg.concurrency.to_string(),
                )
                .set("linger.ms", "5");
            if let Some(ca) = &cfg.ca_file {
                // librdkafka's own message for a bad CA file is cryptic: check it here first.
                super::super::client::read_ca_file("kafka", ca)?;
            }
            for (k, v) in cfg.tls_properties() {
                c.set(k, v);
            }
            let producer: BaseProducer<Reports> =
                c.create_with_context(Reports::default()).map_err(|e| {
                    super::super::client::config_error("kafka", format!("producer: {e}"))
                })?;
            let tpl = |s: &str| {
                Template::parse(s).map_err(|e| super::super::client::config_error("kafka", e))
            };
            Ok(KafkaSink {
                producer,
                topic: tpl(&cfg.topic)?,
                key: cfg.key.as_deref().map(tpl).transpose()?,
                timeout: cfg.timeout.0,
                metrics: SinkMetrics::new("kafka"),
                ca_file: cfg.ca_file.clone(),
                current: None,
            })
        }

        /// Applies the reports received so far to `states` (reports of other batches are
        /// stale: that batch was given up, by a permanent error or a restart of the uploader).
        fn collect(&self, tag: u32, states: &mut [State]) {
            let reports = match self.producer.context().0.lock() {
                Ok(mut v) => std::mem::take(&mut *v),
                Err(_) => Vec::new(),
            };
            for (t, i, r) in reports {
                if t != tag || i >= states.len() || states[i] != State::InFlight {
                    continue;
                }
                states[i] = match r {
                    Ok(()) => State::Done,
                    Err(e) if is_permanent(&e) => State::Refused(e.to_string()),
                    Err(_) => State::ToSend,
                };
            }
        }

        /// librdkafka's last client-level error since the previous call, for messages: `": ..."`
        /// or nothing. A failed certificate check names the `ca_file` it was checked against.
        fn last_error(&self) -> String {
            let Some(e) = self
                .producer
                .context()
                .1
                .lock()
                .ok()
                .and_then(|mut l| l.take())
            else {
                return String::new();
            };
            let tls = ["SSL", "ssl", "certificate", "handshake"]
                .iter()
                .any(|w| e.contains(w));
            match (&self.ca_file, tls) {
                (Some(ca), true) => format!("; last broker error: {e} (ca_file {})", ca.display()),
                _ => format!("; last broker error: {e}"),
            }
        }

        /// Queues message `i`; `Err` when librdkafka refuses it at once.
        fn produce(
            &self,
            batch: &Batch,
            i: usize,
            names: &[(String, Option<String>)],
            tag: u32,
            deadline: Instant,
        ) -> Result<usize, KafkaError> {
            let ev = batch.events[i];
            let m = &batch.files[ev.file as usize];
            let (topic, key) = &names[ev.file as usize];
            let value = batch.event_bytes(i);
            let value = value.strip_suffix(b"\n").unwrap_or(value);
            let id = m.event_id(ev.offset);
            let mut record = BaseRecord::with_opaque_to(topic, ((tag as usize) << 32) | i)
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
                    Ok(()) => return Ok(value.len()),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                        if Instant::now() < deadline =>
                    {
                        record = r;
                        self.producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => return Err(e),
                }
            }
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
            let deadline = started + self.timeout;
            let _in_flight = self.metrics.in_flight();
            let tag = batch.seq as u32;
            let mut states = match self.current.take() {
                Some((seq, s)) if seq == batch.seq && s.len() == n => s,
                _ => vec![State::ToSend; n],
            };
            self.producer.poll(Duration::ZERO);
            self.collect(tag, &mut states);
            // Only errors seen while this batch is delivered explain its failure.
            let _ = self.last_error();
            let names: Vec<(String, Option<String>)> = batch
                .files
                .iter()
                .map(|m| (self.topic.render(m), self.key.as_ref().map(|k| k.render(m))))
                .collect();
            let again = states.iter().any(|s| *s != State::ToSend);
            let mut bytes = 0;
            let mut sent = 0;
            let mut refused_now = None;
            for (i, state) in states.iter_mut().enumerate() {
                if *state != State::ToSend {
                    continue;
                }
                match self.produce(batch, i, &names, tag, deadline) {
                    Ok(b) => {
                        bytes += b;
                        sent += 1;
                        *state = State::InFlight;
                    }
                    Err(e) if is_permanent(&e) => *state = State::Refused(e.to_string()),
                    Err(e) => {
                        // Queue full past the deadline, or the producer is failing: wait for
                        // what is queued and report the batch as not delivered yet.
                        refused_now = Some(e.to_string());
                        break;
                    }
                }
            }
            if again && sent > 0 {
                self.metrics.items_retried(sent);
            }
            // Wait for the reports; an error here is a timeout, judged below by the states.
            let _ = self
                .producer
                .flush(deadline.saturating_duration_since(Instant::now()));
            self.collect(tag, &mut states);
            let count = |f: &dyn Fn(&State) -> bool| states.iter().filter(|s| f(s)).count();
            let done = count(&|s| *s == State::Done);
            let refused = count(&|s| matches!(s, State::Refused(_)));
            let result = if done == n {
                Ok(())
            } else if done + refused == n {
                let why = states
                    .iter()
                    .find_map(|s| match s {
                        State::Refused(w) => Some(w.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                Err(err(
                    SinkErrorKind::Permanent,
                    "rejected",
                    format!("{refused} of {n} messages refused: {why}"),
                ))
            } else {
                let waiting = count(&|s| *s == State::InFlight);
                let failed = n - done - refused - waiting;
                Err(err(
                    SinkErrorKind::Transient,
                    if waiting > 0 { "timeout" } else { "delivery" },
                    format!(
                        "{} of {n} messages not acknowledged within {:?} ({failed} failed, {waiting} still queued){}{}",
                        n - done,
                        self.timeout,
                        refused_now.map(|e| format!(": {e}")).unwrap_or_default(),
                        self.last_error()
                    ),
                ))
            };
            self.metrics
                .request_done(started.elapsed(), bytes, bytes, result.as_ref().err());
            if matches!(&result, Err(e) if e.kind == SinkErrorKind::Transient) {
                self.current = Some((batch.seq, states));
            }
            result
        }

        fn commit(&mut self) -> Result<Vec<u8>, SinkError> {
            Ok(Vec::new())
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
