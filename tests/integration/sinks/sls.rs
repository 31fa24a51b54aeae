//! The `sls` sink against a server that checks a `PutLogs` request as Log Service does: the
//! Host and resource, Content-MD5, the HMAC-SHA1 signature over the documented string to sign,
//! the lz4 (raw block) or zstd body of `x-log-bodyrawsize` bytes, and the `LogGroup` protobuf
//! (declared here from `sls_logs.proto`, apart from the sink's declarations).

use std::sync::{Arc, Mutex};

use hmac::{KeyInit, Mac};
use voltail::batch::Timestamp;
use voltail::sink::SinkErrorKind;

use super::server::{Reply, Request, Server};
use super::{batch, config, file, lines, sink};

#[derive(Clone, PartialEq, prost::Message)]
struct Log {
    #[prost(uint32, required, tag = "1")]
    time: u32,
    #[prost(message, repeated, tag = "2")]
    contents: Vec<Content>,
    #[prost(fixed32, optional, tag = "4")]
    time_ns: Option<u32>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct Content {
    #[prost(string, required, tag = "1")]
    key: String,
    #[prost(string, required, tag = "2")]
    value: String,
}
#[derive(Clone, PartialEq, prost::Message)]
struct LogTag {
    #[prost(string, required, tag = "1")]
    key: String,
    #[prost(string, required, tag = "2")]
    value: String,
}
#[derive(Clone, PartialEq, prost::Message)]
struct LogGroup {
    #[prost(message, repeated, tag = "1")]
    logs: Vec<Log>,
    #[prost(string, optional, tag = "2")]
    reserved: Option<String>,
    #[prost(string, optional, tag = "3")]
    topic: Option<String>,
    #[prost(string, optional, tag = "4")]
    source: Option<String>,
    #[prost(message, repeated, tag = "6")]
    log_tags: Vec<LogTag>,
}

const SECRET: &str = "test-secret-key";

/// Checks everything SLS checks before accepting, and decodes the group.
fn verify(req: &Request, port: u16) -> Result<LogGroup, (u16, String)> {
    use base64::Engine as _;
    use md5::Digest as _;
    let deny = |code: u16, c: &str, m: &str| {
        Err((
            code,
            format!("{{\"errorCode\":\"{c}\",\"errorMessage\":\"{m}\"}}"),
        ))
    };
    if req.method != "POST" || req.target != "/logstores/ls1/shards/lb" {
        return deny(404, "LogStoreNotExist", "bad resource");
    }
    if req.header("host") != Some(&format!("proj1.127.0.0.1:{port}")) {
        return deny(400, "ProjectNotExist", "bad host");
    }
    let md5: String = md5::Md5::digest(&req.body)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    if req.header("content-md5") != Some(md5.as_str()) {
        return deny(400, "InvalidContentMD5", "md5");
    }
    let h = |k: &str| req.header(k).unwrap_or("").to_string();
    if h("x-log-apiversion") != "0.6.0" || h("x-log-signaturemethod") != "hmac-sha1" {
        return deny(400, "InvalidHeader", "api version or signature method");
    }
    // The string to sign, as the API reference spells it.
    let mut canon: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| (k.to_lowercase(), v.clone()))
        .filter(|(k, _)| k.starts_with("x-log-") || k.starts_with("x-acs-"))
        .collect();
    canon.sort();
    let mut sts = format!(
        "POST\n{}\n{}\n{}\n",
        h("content-md5"),
        h("content-type"),
        h("date")
    );
    for (k, v) in &canon {
        sts.push_str(&format!("{k}:{v}\n"));
    }
    sts.push_str("/logstores/ls1/shards/lb");
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(sts.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    if h("authorization") != format!("LOG AKID1:{sig}") {
        return deny(401, "SignatureNotMatch", "signature");
    }
    if httpdate::parse_http_date(&h("date")).is_err() {
        return deny(400, "InvalidDate", "date");
    }
    let raw_size: usize = h("x-log-bodyrawsize")
        .parse()
        .map_err(|_| (400, "size".to_string()))?;
    let raw = match h("x-log-compresstype").as_str() {
        "lz4" => lz4_flex::block::decompress(&req.body, raw_size).expect("lz4 block"),
        "zstd" => zstd::decode_all(&req.body[..]).expect("zstd"),
        other => return deny(400, "InvalidCompressType", other),
    };
    assert_eq!(raw.len(), raw_size);
    Ok(prost::Message::decode(&raw[..]).expect("LogGroup"))
}

#[derive(Default)]
struct Sls {
    groups: Vec<LogGroup>,
    script: Vec<Reply>,
    requests: usize,
}

fn sls() -> (Server, Arc<Mutex<Sls>>) {
    let state = Arc::new(Mutex::new(Sls::default()));
    let st = state.clone();
    let port = Arc::new(std::sync::OnceLock::<u16>::new());
    let p2 = port.clone();
    let server = Server::start(move |req| {
        let mut s = st.lock().expect("lock");
        s.requests += 1;
        if !s.script.is_empty() {
            return s.script.remove(0);
        }
        match verify(req, *p2.get().expect("port set")) {
            Ok(g) => {
                s.groups.push(g);
                Reply::Status(200, vec![("x-log-requestid".into(), "r1".into())], vec![])
            }
            Err((code, body)) => Reply::Status(code, vec![], body.into_bytes()),
        }
    });
    port.set(server.addr.port()).expect("once");
    (server, state)
}

fn cfg(server: &Server, extra: &str) -> voltail::config::Config {
    config(&format!(
        "type = \"sls\"\nendpoint = \"http://{}\"\nproject = \"proj1\"\nlogstore = \"ls1\"\naccess_key_id = \"AKID1\"\naccess_key_secret = \"{SECRET}\"\ntopic = \"{{app}}\"\nsource = \"node-7\"\ntimeout = \"2s\"\n{extra}",
        server.addr
    ))
}

fn check(compression: &str) {
    let (server, state) = sls();
    let c = cfg(&server, &format!("compression = \"{compression}\"\n"));
    let mut s = sink(&c);
    let a = file(
        1,
        "/var/log/web/ns1_a/0.log",
        &[("app", "web"), ("pod", "a")],
        1,
    );
    let b = file(
        2,
        "/var/log/db/ns1_b/0.log",
        &[("app", "db"), ("pod", "b")],
        2,
    );
    let ls = lines(50);
    let ts = Timestamp::now();
    let evs: Vec<_> = ls
        .iter()
        .enumerate()
        .map(|(i, l)| (if i % 2 == 0 { &a } else { &b }, l.as_str(), i as u64))
        .collect();
    s.send(&batch(c.sink(), &evs, &ts)).expect("put logs");
    let st = state.lock().expect("lock");
    assert_eq!(st.groups.len(), 2, "one LogGroup per file");
    for (g, f) in st.groups.iter().zip([&a, &b]) {
        assert_eq!(g.topic.as_deref(), Some(f.tags[0].1.as_str()));
        assert_eq!(g.source.as_deref(), Some("node-7"));
        let tags: Vec<(String, String)> = g
            .log_tags
            .iter()
            .map(|t| (t.key.clone(), t.value.clone()))
            .collect();
        let mut want = vec![("__path__".to_string(), f.path.clone())];
        want.extend(f.tags.iter().cloned());
        assert_eq!(tags, want);
        let msgs: Vec<&str> = evs
            .iter()
            .filter(|e| e.0.key == f.key)
            .map(|e| e.1)
            .collect();
        assert_eq!(g.logs.len(), msgs.len());
        for (log, m) in g.logs.iter().zip(msgs) {
            assert_eq!(log.time as u128, ts.unix_nanos / 1_000_000_000);
            assert_eq!(
                log.time_ns.map(|n| n as u128),
                Some(ts.unix_nanos % 1_000_000_000)
            );
            assert_eq!(log.contents.len(), 1);
            assert_eq!(log.contents[0].key, "content");
            assert_eq!(log.contents[0].value, m);
        }
    }
}

#[test]
fn sls_lz4_log_groups_are_signed_and_complete() {
    check("lz4");
}

#[test]
fn sls_zstd_log_groups_are_signed_and_complete() {
    check("zstd");
}

/// The first group is accepted, the second meets a 500, a quota error and a dropped
/// connection: each transient, and only the second group is sent again. A wrong secret is a
/// permanent SignatureNotMatch.
#[test]
fn sls_failures_and_partial_resend() {
    let (server, state) = sls();
    let c = cfg(&server, "");
    let mut s = sink(&c);
    let a = file(1, "/a", &[("app", "x")], 1);
    let b = file(2, "/b", &[("app", "y")], 2);
    let bt = batch(
        c.sink(),
        &[(&a, "a1", 0), (&b, "b1", 0), (&a, "a2", 3)],
        &Timestamp::now(),
    );
    {
        let mut st = state.lock().expect("lock");
        st.script = vec![
            Reply::Status(200, vec![], vec![]),
            Reply::status(500, "{\"errorCode\":\"InternalServerError\"}"),
        ];
    }
    // The scripted 200 accepts group a (unrecorded); the 500 hits group b.
    let e = s.send(&bt).expect_err("500 on the second group");
    assert_eq!(e.kind, SinkErrorKind::Transient);
    state.lock().expect("lock").script = vec![
        Reply::status(
            403,
            "{\"errorCode\":\"WriteQuotaExceed\",\"errorMessage\":\"quota\"}",
        ),
        Reply::Drop,
    ];
    let e = s.send(&bt).expect_err("quota");
    assert_eq!((e.kind, e.reason), (SinkErrorKind::Transient, "quota"));
    let e = s.send(&bt).expect_err("dropped");
    assert_eq!(e.kind, SinkErrorKind::Transient);
    s.send(&bt).expect("ok");
    {
        let st = state.lock().expect("lock");
        assert_eq!(st.requests, 5, "2, then group b alone 3 times");
        assert_eq!(st.groups.len(), 1);
        assert_eq!(st.groups[0].topic.as_deref(), Some("y"));
    }
    let bad = voltail::config::Config::parse(
        std::path::Path::new("t.toml"),
        &format!(
            "data_dir = \"/tmp/x\"\n[[sources]]\nname = \"app\"\ninclude = [\"/l/*.log\"]\n[sink]\ntype = \"sls\"\nendpoint = \"http://{}\"\nproject = \"proj1\"\nlogstore = \"ls1\"\naccess_key_id = \"AKID1\"\naccess_key_secret = \"wrong\"\n",
            server.addr
        ),
    )
    .expect("config");
    let e = sink(&bad)
        .send(&batch(bad.sink(), &[(&a, "x", 0)], &Timestamp::now()))
        .expect_err("bad signature");
    assert_eq!(e.kind, SinkErrorKind::Permanent);
    assert!(e.message.contains("SignatureNotMatch"), "{e}");
}
