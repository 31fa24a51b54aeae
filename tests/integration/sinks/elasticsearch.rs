//! The `elasticsearch` sink against a server that speaks `_bulk` like Elasticsearch: it decodes
//! gzip NDJSON action/document pairs, keeps documents by `_id` (409 for `create` of an existing
//! id), and fails chosen items with 429 or 400, or whole requests with 503.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};

use voltail::batch::Timestamp;
use voltail::sink::SinkErrorKind;

use super::server::{Reply, Request, Server};
use super::{batch, config, file, lines, sink};

/// The fake cluster's state.
#[derive(Default)]
struct Cluster {
    /// `(index, id)` -> document.
    docs: HashMap<(String, String), serde_json::Value>,
    /// Ids of each `_bulk` request, in order.
    requests: Vec<Vec<String>>,
    /// Ids to fail once with 429.
    fail_once: Vec<String>,
    /// Ids always refused with 400.
    refuse: Vec<String>,
    /// Whole requests to answer 503 first.
    unavailable: usize,
    headers: Vec<Request>,
}

fn body(req: &Request) -> Vec<u8> {
    if req.header("content-encoding") == Some("gzip") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&req.body[..])
            .read_to_end(&mut out)
            .expect("gzip");
        out
    } else {
        req.body.clone()
    }
}

fn bulk(c: &mut Cluster, req: &Request) -> Reply {
    c.headers.push(req.clone());
    assert_eq!(
        req.target,
        "/_bulk?filter_path=errors,items.*.status,items.*.error.type,items.*.error.reason"
    );
    assert_eq!(req.header("content-type"), Some("application/x-ndjson"));
    if c.unavailable > 0 {
        c.unavailable -= 1;
        return Reply::Status(503, vec![], b"{\"error\":\"unavailable\"}".to_vec());
    }
    let text = String::from_utf8(body(req)).expect("utf8");
    assert!(text.ends_with('\n'), "bulk bodies end with a newline");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len() % 2, 0, "action/document pairs");
    let mut items = Vec::new();
    let mut errors = false;
    let mut ids = Vec::new();
    for pair in lines.chunks(2) {
        let action: serde_json::Value = serde_json::from_str(pair[0]).expect("action json");
        let doc: serde_json::Value = serde_json::from_str(pair[1]).expect("doc json");
        let (op, meta) = action
            .as_object()
            .and_then(|o| o.iter().next())
            .expect("one action");
        let index = meta["_index"].as_str().expect("_index").to_string();
        let id = meta["_id"].as_str().expect("_id").to_string();
        ids.push(id.clone());
        let status = if let Some(p) = c.fail_once.iter().position(|f| *f == id) {
            c.fail_once.remove(p);
            429
        } else if c.refuse.contains(&id) {
            400
        } else if op == "create" && c.docs.contains_key(&(index.clone(), id.clone())) {
            409
        } else {
            c.docs.insert((index.clone(), id.clone()), doc);
            201
        };
        let mut item = serde_json::json!({"_index": index, "_id": id, "status": status});
        match status {
            429 => {
                errors = true;
                item["error"] = serde_json::json!({"type": "es_rejected_execution_exception", "reason": "queue full"});
            }
            400 => {
                errors = true;
                item["error"] = serde_json::json!({"type": "mapper_parsing_exception", "reason": "failed to parse field [message]"});
            }
            409 => {
                errors = true;
                item["error"] = serde_json::json!({"type": "version_conflict_engine_exception", "reason": "document already exists"});
            }
            _ => {}
        }
        items.push(serde_json::json!({ op.clone(): item }));
    }
    c.requests.push(ids);
    let resp = serde_json::json!({"took": 1, "errors": errors, "items": items});
    Reply::Status(200, vec![], serde_json::to_vec(&resp).expect("json"))
}

fn cluster() -> (Server, Arc<Mutex<Cluster>>) {
    let c = Arc::new(Mutex::new(Cluster::default()));
    let c2 = c.clone();
    let s = Server::start(move |req| bulk(&mut c2.lock().expect("lock"), req));
    (s, c)
}

#[test]
fn elasticsearch_documents_have_every_field_and_index_from_tags() {
    let (server, c) = cluster();
    let cfg = config(&format!(
        "type = \"elasticsearch\"\nendpoint = \"{}\"\nindex = \"logs-{{namespace}}\"\nauth = {{ type = \"apikey\", key = \"a2V5\" }}\n",
        server.url("")
    ));
    let mut s = sink(&cfg);
    let a = file(1, "/var/log/a.log", &[("namespace", "ns1")], 0xa);
    let b = file(2, "/var/log/b.log", &[("namespace", "ns2")], 0xb);
    let ts = Timestamp::now();
    let ls = lines(40);
    let evs: Vec<_> = ls
        .iter()
        .enumerate()
        .map(|(i, l)| (if i % 3 == 0 { &a } else { &b }, l.as_str(), i as u64 * 100))
        .collect();
    s.send(&batch(cfg.sink(), &evs, &ts)).expect("bulk");
    let c = c.lock().expect("lock");
    assert_eq!(c.docs.len(), 40);
    assert_eq!(c.headers[0].header("authorization"), Some("ApiKey a2V5"));
    assert_eq!(c.headers[0].header("content-encoding"), Some("gzip"));
    for (f, msg, off) in &evs {
        let index = format!("logs-{}", f.tags[0].1);
        let doc = &c.docs[&(index, f.event_id(*off))];
        assert_eq!(doc["message"], *msg);
        assert_eq!(doc["offset"], *off);
        assert_eq!(doc["file"], f.path.as_str());
        assert_eq!(doc["source"], "app");
        assert_eq!(doc["tags"]["namespace"], f.tags[0].1.as_str());
        assert_eq!(doc["@timestamp"], ts.rfc3339());
    }
}

/// Items refused with 429 are the only ones sent again; a whole-request 503 is transient; a
/// re-send of indexed items (a lost answer) gets 409s that count as delivered: no duplicates.
#[test]
fn elasticsearch_retries_only_the_retryable_items() {
    let (server, c) = cluster();
    let cfg = config(&format!(
        "type = \"elasticsearch\"\nendpoint = \"{}\"\ncompression = \"none\"\n",
        server.url("")
    ));
    let mut s = sink(&cfg);
    let f = file(1, "/var/log/a.log", &[], 0xf);
    let ls = lines(20);
    let evs: Vec<_> = ls
        .iter()
        .enumerate()
        .map(|(i, l)| (&f, l.as_str(), i as u64))
        .collect();
    let b = batch(cfg.sink(), &evs, &Timestamp::now());
    let flaky: Vec<String> = [3u64, 7, 11].iter().map(|&o| f.event_id(o)).collect();
    {
        let mut c = c.lock().expect("lock");
        c.fail_once = flaky.clone();
        c.unavailable = 0;
    }
    let e = s.send(&b).expect_err("three items were refused for now");
    assert_eq!((e.kind, e.reason), (SinkErrorKind::Transient, "bulk_items"));
    assert!(e.message.starts_with("3 of 20 items"), "{e}");
    c.lock().expect("lock").unavailable = 1;
    let e = s.send(&b).expect_err("503");
    assert_eq!(e.kind, SinkErrorKind::Transient);
    s.send(&b).expect("the rest goes through");
    {
        let c = c.lock().expect("lock");
        assert_eq!(c.requests.len(), 2, "the 503 request was not decoded");
        assert_eq!(c.requests[0].len(), 20);
        assert_eq!(
            c.requests[1], flaky,
            "only the refused items were sent again"
        );
        assert_eq!(c.docs.len(), 20);
    }
    // The uploader never saw the Ok (crash, lost answer): the whole batch comes again.
    let mut s2 = sink(&cfg);
    s2.send(&b).expect("409s count as delivered");
    assert_eq!(c.lock().expect("lock").docs.len(), 20);
}

#[test]
fn elasticsearch_refused_items_make_a_permanent_error_with_the_reason() {
    let (server, c) = cluster();
    let cfg = config(&format!(
        "type = \"elasticsearch\"\nendpoint = \"{}\"\naction = \"index\"\n",
        server.url("")
    ));
    let mut s = sink(&cfg);
    let f = file(1, "/var/log/a.log", &[], 0xf);
    let evs: Vec<_> = (0..10u64).map(|i| (&f, "x", i)).collect();
    let b = batch(cfg.sink(), &evs, &Timestamp::now());
    {
        let mut c = c.lock().expect("lock");
        c.refuse = vec![f.event_id(2)];
        c.fail_once = vec![f.event_id(5)];
    }
    let e = s.send(&b).expect_err("one retryable, one refused");
    assert_eq!(e.kind, SinkErrorKind::Transient);
    let e = s.send(&b).expect_err("only the refused one is left");
    assert_eq!(e.kind, SinkErrorKind::Permanent);
    assert!(e.message.contains("mapper_parsing_exception"), "{e}");
    assert!(e.message.starts_with("1 of 10 items refused"), "{e}");
    let c = c.lock().expect("lock");
    assert_eq!(c.requests[1], vec![f.event_id(5)]);
    assert_eq!(c.docs.len(), 9);
}
