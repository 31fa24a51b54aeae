//! The `kafka` sink against librdkafka's mock cluster (a Kafka-protocol broker set inside this
//! process): messages are consumed back and compared field by field; produce errors and downed
//! brokers are injected.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use voltail::batch::Timestamp;
use voltail::sink::SinkErrorKind;

use super::{batch, config, file, lines, sink};

/// A consumed message.
#[derive(Debug)]
struct Got {
    topic: String,
    partition: i32,
    key: Option<String>,
    id: String,
    value: serde_json::Value,
}

/// Reads every message of `topics` (3 partitions each) from the beginning, until `want` or 20 s.
fn consume(bootstrap: &str, topics: &[&str], want: usize) -> Vec<Got> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "voltail-test")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..3 {
            tpl.add_partition_offset(t, p, Offset::Beginning)
                .expect("partition");
        }
    }
    c.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let t = Instant::now();
    while out.len() < want && t.elapsed() < Duration::from_secs(20) {
        let Some(m) = c.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.expect("message");
        let id = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "voltail-id"))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8(v.to_vec()).expect("utf8 id"))
            .expect("voltail-id header");
        out.push(Got {
            topic: m.topic().to_string(),
            partition: m.partition(),
            key: m
                .key()
                .map(|k| String::from_utf8(k.to_vec()).expect("utf8 key")),
            id,
            value: serde_json::from_slice(m.payload().expect("payload")).expect("json value"),
        });
    }
    // Anything beyond `want` would be a duplicate: look a little longer for one.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(500) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            panic!("unexpected extra message at offset {}", m.offset());
        }
    }
    out
}

fn cluster() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let mc = MockCluster::new(3).expect("mock cluster");
    for t in ["logs-ns1", "logs-ns2"] {
        mc.create_topic(t, 3, 3).expect("topic");
    }
    mc
}

#[test]
fn kafka_messages_are_consumed_back_with_topic_key_and_id() {
    let mc = cluster();
    let bootstrap = mc.bootstrap_servers();
    let cfg = config(&format!(
        "type = \"kafka\"\nbrokers = \"{bootstrap}\"\ntopic = \"logs-{{namespace}}\"\nkey = \"{{namespace}}/{{pod}}\"\n"
    ));
    let mut s = sink(&cfg);
    let a = file(
        1,
        "/var/log/a.log",
        &[("namespace", "ns1"), ("pod", "a")],
        0xa,
    );
    let b = file(
        2,
        "/var/log/b.log",
        &[("namespace", "ns2"), ("pod", "b")],
        0xb,
    );
    let ls = lines(300);
    let evs: Vec<_> = ls
        .iter()
        .enumerate()
        .map(|(i, l)| (if i % 3 == 0 { &a } else { &b }, l.as_str(), i as u64 * 10))
        .collect();
    s.send(&batch(cfg.sink(), &evs, &Timestamp::now()))
        .expect("delivered");
    let got = consume(&bootstrap, &["logs-ns1", "logs-ns2"], 300);
    assert_eq!(got.len(), 300);
    let by_id: HashMap<&str, &Got> = got.iter().map(|g| (g.id.as_str(), g)).collect();
    assert_eq!(by_id.len(), 300, "no duplicates");
    let mut partition_of_key = HashMap::new();
    for (f, msg, off) in &evs {
        let g = by_id[f.event_id(*off).as_str()];
        let ns = &f.tags[0].1;
        assert_eq!(g.topic, format!("logs-{ns}"));
        assert_eq!(
            g.key.as_deref(),
            Some(format!("{ns}/{}", f.tags[1].1).as_str())
        );
        assert_eq!(g.value["message"], *msg);
        assert_eq!(g.value["offset"], *off);
        assert_eq!(g.value["file"], f.path.as_str());
        assert_eq!(g.value["id"], g.id.as_str());
        assert_eq!(g.value["tags"]["pod"], f.tags[1].1.as_str());
        // One key, one partition: a pod's lines stay in order.
        let p = partition_of_key.entry(g.key.clone()).or_insert(g.partition);
        assert_eq!(*p, g.partition);
    }
    // Order within a partition follows file order.
    let offsets: Vec<u64> = got
        .iter()
        .filter(|g| g.topic == "logs-ns1")
        .map(|g| g.value["offset"].as_u64().expect("offset"))
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "ordered per key");
}

/// Retriable produce errors are absorbed by the idempotent producer (no duplicates); with every
/// broker down the batch fails as transient within the timeout, and once they are back only the
/// undelivered messages are produced: each arrives exactly once.
#[test]
fn kafka_outage_is_transient_and_resend_does_not_duplicate() {
    let mc = cluster();
    let bootstrap = mc.bootstrap_servers();
    let cfg = config(&format!(
        "type = \"kafka\"\nbrokers = \"{bootstrap}\"\ntopic = \"logs-{{namespace}}\"\ntimeout = \"3s\"\n"
    ));
    let mut s = sink(&cfg);
    let a = file(1, "/var/log/a.log", &[("namespace", "ns1")], 0xa);
    let first: Vec<_> = (0..50u64).map(|i| (&a, "first", i)).collect();
    mc.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 3],
    );
    s.send(&batch(cfg.sink(), &first, &Timestamp::now()))
        .expect("retried inside librdkafka");

    let second: Vec<_> = (50..100u64).map(|i| (&a, "second", i)).collect();
    let b2 = batch(cfg.sink(), &second, &Timestamp::now());
    mc.broker_down(-1).expect("down");
    let e = s.send(&b2).expect_err("every broker is down");
    assert_eq!(e.kind, SinkErrorKind::Transient, "{e}");
    mc.broker_up(-1).expect("up");
    // As the uploader does: the same batch again until acknowledged (librdkafka may take a few
    // seconds to reconnect).
    let t = Instant::now();
    while let Err(e) = s.send(&b2) {
        assert_eq!(e.kind, SinkErrorKind::Transient, "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "not delivered after the outage: {e}"
        );
    }
    let got = consume(&bootstrap, &["logs-ns1"], 100);
    let mut ids: Vec<&str> = got.iter().map(|g| g.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 100);
    assert_eq!(got.len(), 100, "no duplicates");
}
