//! The `kafka` sink against librdkafka's mock cluster (a Kafka-protocol broker set inside this
//! process): messages are consumed back and compared field by field; produce errors and downed
//! brokers are injected.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use voltail::batch::Timestamp;
use voltail::sink::SinkErrorKind;

use super::{batch, config, file, lines, sink, tls_pair};

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
    consume_with(bootstrap, topics, want, &[])
}

/// [`consume`] with more librdkafka properties (TLS).
fn consume_with(bootstrap: &str, topics: &[&str], want: usize, extra: &[(&str, &str)]) -> Vec<Got> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", bootstrap)
        .set("group.id", "voltail-test")
        .set("enable.auto.commit", "false");
    for (k, v) in extra {
        cc.set(*k, *v);
    }
    let c: BaseConsumer = cc.create().expect("consumer");
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

/// A TLS terminator (rustls, private CA) in front of a plaintext broker: each connection is
/// decrypted and relayed both ways. Counts completed handshakes.
struct TlsProxy {
    port: u16,
    handshakes: Arc<AtomicUsize>,
}

fn tls_proxy(tls: Arc<rustls::ServerConfig>, upstream: SocketAddr) -> TlsProxy {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let port = listener.local_addr().expect("addr").port();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let hs = handshakes.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let (tls, hs) = (tls.clone(), hs.clone());
            std::thread::spawn(move || {
                let Ok(sc) = rustls::ServerConnection::new(tls) else {
                    return;
                };
                let Ok(mut up) = TcpStream::connect(upstream) else {
                    return;
                };
                let timeout = Some(Duration::from_millis(5));
                let _ = conn.set_read_timeout(timeout);
                let _ = up.set_read_timeout(timeout);
                let mut client = rustls::StreamOwned::new(sc, conn);
                let idle = |e: &std::io::Error| {
                    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
                };
                let mut counted = false;
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match client.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            if up.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(e) if idle(&e) => {}
                        Err(_) => return,
                    }
                    if !counted && !client.conn.is_handshaking() {
                        counted = true;
                        hs.fetch_add(1, Ordering::SeqCst);
                    }
                    match up.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            if client
                                .write_all(&buf[..n])
                                .and_then(|()| client.flush())
                                .is_err()
                            {
                                return;
                            }
                        }
                        Err(e) if idle(&e) => {}
                        Err(_) => return,
                    }
                }
            });
        }
    });
    TlsProxy { port, handshakes }
}

/// Kafka over TLS with a private CA, end to end: librdkafka's mock broker advertises a TLS
/// proxy (`rd_kafka_mock_broker_set_host_port`), so every connection, bootstrap and produce
/// alike, goes through the handshake; the messages are consumed back over TLS too. With the
/// wrong CA the batch fails as transient and the error names the certificate check and the
/// `ca_file`.
#[test]
fn kafka_tls_with_a_custom_ca_through_a_tls_proxy() {
    // A one-broker mock cluster, owned by a client made only to hold it.
    let holder: BaseProducer = ClientConfig::new()
        .set("test.mock.num.brokers", "1")
        .create()
        .expect("mock cluster holder");
    let mc = holder.client().mock_cluster().expect("mock cluster");
    mc.create_topic("logs-tls", 3, 1).expect("topic");
    let upstream: SocketAddr = mc
        .bootstrap_servers()
        .parse()
        .expect("the mock broker listens on an ip:port");
    let (ca_pem, tls) = tls_pair("localhost");
    let proxy = tls_proxy(tls, upstream);
    // SAFETY: the holder owns the mock cluster and outlives every use of the pointer; the
    // host string is a NUL-terminated literal that librdkafka copies.
    unsafe {
        let raw = rdkafka::bindings::rd_kafka_handle_mock_cluster(holder.client().native_ptr());
        assert!(!raw.is_null(), "mock cluster handle");
        rdkafka::bindings::rd_kafka_mock_broker_set_host_port(
            raw,
            1,
            c"localhost".as_ptr(),
            proxy.port as i32,
        );
    }
    let dir = tempfile::tempdir().expect("tmp");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &ca_pem).expect("write ca");
    let brokers = format!("localhost:{}", proxy.port);
    let sink_cfg = |ca: &std::path::Path| {
        config(&format!(
            "type = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"logs-tls\"\ntimeout = \"5s\"\nca_file = \"{}\"\n[sink.options]\n\"broker.address.family\" = \"v4\"\n",
            ca.display()
        ))
    };

    let cfg = sink_cfg(&ca);
    let mut s = sink(&cfg);
    let f = file(1, "/var/log/a.log", &[], 0xa);
    let evs: Vec<_> = (0..40u64).map(|i| (&f, "over tls", i * 9)).collect();
    s.send(&batch(cfg.sink(), &evs, &Timestamp::now()))
        .expect("delivered through the TLS proxy");
    assert!(proxy.handshakes.load(Ordering::SeqCst) >= 1, "TLS was used");
    let ca_s = ca.display().to_string();
    let got = consume_with(
        &brokers,
        &["logs-tls"],
        40,
        &[
            ("security.protocol", "ssl"),
            ("ssl.ca.location", ca_s.as_str()),
            ("broker.address.family", "v4"),
        ],
    );
    assert_eq!(got.len(), 40);

    // Another CA: the handshake fails, the batch is transient, the error says why and names it.
    let (other_pem, _) = tls_pair("localhost");
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, other_pem).expect("write other ca");
    let cfg = sink_cfg(&other);
    let before = proxy.handshakes.load(Ordering::SeqCst);
    let e = sink(&cfg)
        .send(&batch(cfg.sink(), &evs[..1], &Timestamp::now()))
        .expect_err("unknown CA");
    assert_eq!(e.kind, SinkErrorKind::Transient, "{e}");
    assert!(e.message.contains("certificate"), "{e}");
    assert!(e.message.contains(&*other.to_string_lossy()), "{e}");
    assert_eq!(
        proxy.handshakes.load(Ordering::SeqCst),
        before,
        "no handshake completed"
    );

    // A ca_file without a certificate is a start-up error naming it.
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate").expect("write");
    let e = voltail::sink::build(&sink_cfg(&bad))
        .err()
        .expect("no certificate in ca_file");
    assert!(e.message.contains("holds no certificate"), "{e}");
}
