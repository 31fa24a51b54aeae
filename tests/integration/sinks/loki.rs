//! The `loki` sink against a server that decodes the push API as Loki does: snappy, then the
//! `logproto.PushRequest` protobuf (declared here from Loki's `push.proto`, independently of the
//! sink's own declarations), deduplicating identical entries of a stream like the ingester.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use voltail::batch::Timestamp;
use voltail::sink::SinkErrorKind;

use super::server::{Reply, Request, Server};
use super::{batch, config, file, lines, sink};

#[derive(Clone, PartialEq, prost::Message)]
struct PushRequest {
    #[prost(message, repeated, tag = "1")]
    streams: Vec<StreamAdapter>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct StreamAdapter {
    #[prost(string, tag = "1")]
    labels: String,
    #[prost(message, repeated, tag = "2")]
    entries: Vec<EntryAdapter>,
    #[prost(uint64, tag = "3")]
    hash: u64,
}
#[derive(Clone, PartialEq, prost::Message)]
struct EntryAdapter {
    #[prost(message, optional, tag = "1")]
    timestamp: Option<ProtoTimestamp>,
    #[prost(string, tag = "2")]
    line: String,
    #[prost(message, repeated, tag = "3")]
    structured_metadata: Vec<LabelPairAdapter>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct LabelPairAdapter {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}
#[derive(Clone, PartialEq, prost::Message)]
struct ProtoTimestamp {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// One stored entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Stored {
    ts: i128,
    line: String,
    metadata: Vec<(String, String)>,
}

#[derive(Default)]
struct Loki {
    /// labels -> entries in arrival order.
    streams: BTreeMap<String, Vec<Stored>>,
    seen: BTreeSet<(String, i128, String)>,
    script: Vec<Reply>,
    requests: Vec<Request>,
}

fn push(l: &mut Loki, req: &Request) -> Reply {
    l.requests.push(req.clone());
    if !l.script.is_empty() {
        return l.script.remove(0);
    }
    assert_eq!(req.target, "/loki/api/v1/push");
    assert_eq!(req.header("content-type"), Some("application/x-protobuf"));
    let raw = snap::raw::Decoder::new()
        .decompress_vec(&req.body)
        .expect("snappy block");
    let push: PushRequest = prost::Message::decode(&raw[..]).expect("PushRequest");
    for s in push.streams {
        assert!(
            s.labels.starts_with('{') && s.labels.ends_with('}'),
            "{}",
            s.labels
        );
        let mut prev = i128::MIN;
        for e in s.entries {
            let t = e.timestamp.expect("timestamp");
            let ts = t.seconds as i128 * 1_000_000_000 + t.nanos as i128;
            assert!(ts >= prev, "entries of a stream are ordered");
            prev = ts;
            if let Some(last) = l.streams.get(&s.labels).and_then(|v| v.last()) {
                if ts < last.ts {
                    return Reply::status(400, "entry out of order");
                }
            }
            if !l.seen.insert((s.labels.clone(), ts, e.line.clone())) {
                continue; // Loki drops an identical entry of the same stream
            }
            l.streams.entry(s.labels.clone()).or_default().push(Stored {
                ts,
                line: e.line,
                metadata: e
                    .structured_metadata
                    .into_iter()
                    .map(|p| (p.name, p.value))
                    .collect(),
            });
        }
    }
    Reply::Status(204, vec![], vec![])
}

fn loki() -> (Server, Arc<Mutex<Loki>>) {
    let l = Arc::new(Mutex::new(Loki::default()));
    let l2 = l.clone();
    let s = Server::start(move |req| push(&mut l2.lock().expect("lock"), req));
    (s, l)
}

#[test]
fn loki_streams_labels_metadata_and_order() {
    let (server, l) = loki();
    let cfg = config(&format!(
        "type = \"loki\"\nendpoint = \"{}\"\ntenant_id = \"team-a\"\nlabels = [\"namespace\", \"source\"]\nstatic_labels = {{ cluster = \"c1\" }}\n",
        server.url("")
    ));
    let mut s = sink(&cfg);
    let a = file(
        1,
        "/var/log/a.log",
        &[("namespace", "ns1"), ("pod", "a-1")],
        1,
    );
    let a2 = file(
        2,
        "/var/log/a2.log",
        &[("namespace", "ns1"), ("pod", "a-2")],
        2,
    );
    let b = file(
        3,
        "/var/log/b.log",
        &[("namespace", "n\"s2"), ("pod", "b-1")],
        3,
    );
    let ls = lines(90);
    let t1 = Timestamp::at(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    let evs: Vec<_> = ls
        .iter()
        .enumerate()
        .map(|(i, l)| ([&a, &a2, &b][i % 3], l.as_str(), i as u64))
        .collect();
    s.send(&batch(cfg.sink(), &evs[..60], &t1)).expect("push 1");
    // The clock stepped back between two reads: entries keep their order with the last time.
    let t0 = Timestamp::at(std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000));
    s.send(&batch(cfg.sink(), &evs[60..], &t0)).expect("push 2");
    let l = l.lock().expect("lock");
    assert_eq!(l.requests[0].header("x-scope-orgid"), Some("team-a"));
    let ns1 = "{cluster=\"c1\", namespace=\"ns1\", source=\"app\"}";
    let ns2 = "{cluster=\"c1\", namespace=\"n\\\"s2\", source=\"app\"}";
    assert_eq!(l.streams.keys().collect::<Vec<_>>(), vec![ns2, ns1]);
    let s1 = &l.streams[ns1];
    assert_eq!(s1.len(), 60);
    let want: Vec<_> = evs.iter().filter(|e| e.0.tags[0].1 == "ns1").collect();
    for (got, (f, msg, _)) in s1.iter().zip(&want) {
        assert_eq!(got.line, *msg);
        assert_eq!(
            got.ts, t1.unix_nanos as i128,
            "never before an earlier entry"
        );
        assert_eq!(
            got.metadata,
            vec![
                ("file".to_string(), f.path.clone()),
                ("pod".to_string(), f.tags[1].1.clone())
            ]
        );
    }
    assert_eq!(l.streams[ns2].len(), 30);
}

#[test]
fn loki_json_lines_carry_the_other_tags() {
    let (server, l) = loki();
    let cfg = config(&format!(
        "type = \"loki\"\nendpoint = \"{}\"\nlabels = [\"namespace\"]\nextra = \"json\"\n",
        server.url("")
    ));
    let mut s = sink(&cfg);
    let a = file(
        1,
        "/var/log/a.log",
        &[("namespace", "ns1"), ("pod", "a-1")],
        1,
    );
    s.send(&batch(
        cfg.sink(),
        &[(&a, "he said \"hi\"", 0)],
        &Timestamp::now(),
    ))
    .expect("push");
    let l = l.lock().expect("lock");
    let e = &l.streams["{namespace=\"ns1\"}"][0];
    assert!(e.metadata.is_empty());
    let v: serde_json::Value = serde_json::from_str(&e.line).expect("json line");
    assert_eq!(
        v,
        serde_json::json!({"message": "he said \"hi\"", "file": "/var/log/a.log", "pod": "a-1"})
    );
}

/// 429 with Retry-After and 500 are transient, a dropped connection too, 400 is permanent with
/// Loki's reason; the batch sent again after the failures is stored once.
#[test]
fn loki_failures_and_resend_without_duplicates() {
    let (server, l) = loki();
    let cfg = config(&format!(
        "type = \"loki\"\nendpoint = \"{}\"\ntimeout = \"2s\"\n",
        server.url("")
    ));
    let mut s = sink(&cfg);
    let a = file(1, "/var/log/a.log", &[], 1);
    let ls = lines(10);
    let evs: Vec<_> = ls
        .iter()
        .enumerate()
        .map(|(i, l)| (&a, l.as_str(), i as u64))
        .collect();
    let b = batch(cfg.sink(), &evs, &Timestamp::now());
    l.lock().expect("lock").script = vec![
        Reply::Status(
            429,
            vec![("Retry-After".into(), "3".into())],
            b"ingestion rate limit exceeded".to_vec(),
        ),
        Reply::status(500, "ingester unavailable"),
        Reply::Drop,
        Reply::status(400, "stream labels invalid"),
    ];
    let e = s.send(&b).expect_err("429");
    assert_eq!(
        (e.kind, e.retry_after),
        (SinkErrorKind::Transient, Some(Duration::from_secs(3)))
    );
    assert_eq!(s.send(&b).expect_err("500").kind, SinkErrorKind::Transient);
    assert_eq!(s.send(&b).expect_err("drop").kind, SinkErrorKind::Transient);
    let e = s.send(&b).expect_err("400");
    assert_eq!(e.kind, SinkErrorKind::Permanent);
    assert!(e.message.contains("stream labels invalid"), "{e}");
    s.send(&b).expect("ok");
    s.send(&b).expect("a lost answer: the same batch again");
    let l = l.lock().expect("lock");
    assert_eq!(l.streams["{source=\"app\"}"].len(), 10);
}
