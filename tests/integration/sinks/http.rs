//! The `http` sink against a server that decodes zstd/gzip NDJSON and checks every field.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use voltail::batch::Timestamp;
use voltail::sink::SinkErrorKind;

use super::server::{Reply, Request, Server};
use super::{batch, config, file, lines, sink, tls_pair};

/// Decodes a body as the `Content-Encoding` header says.
fn decode(req: &Request) -> Vec<u8> {
    match req.header("content-encoding") {
        Some("zstd") => zstd::decode_all(&req.body[..]).expect("zstd body"),
        Some("gzip") => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&req.body[..])
                .read_to_end(&mut out)
                .expect("gzip body");
            out
        }
        None => req.body.clone(),
        Some(other) => panic!("unexpected content-encoding {other}"),
    }
}

fn check_fields(got: &[serde_json::Value], sent: &[(String, u64)]) {
    assert_eq!(got.len(), sent.len());
    for (v, (msg, off)) in got.iter().zip(sent) {
        assert_eq!(v["message"], msg.as_str());
        assert_eq!(v["offset"], *off);
        assert_eq!(v["source"], "app");
        assert_eq!(v["file"], "/var/log/pods/ns1_pod-a_uid/c/0.log");
        assert_eq!(v["tags"]["namespace"], "ns1");
        assert_eq!(v["tags"]["pod"], "pod-a");
        assert_eq!(v["id"], format!("00000000deadbeef-{off:x}"));
        assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
}

fn events(n: usize) -> Vec<(String, u64)> {
    let mut off = 0;
    lines(n)
        .into_iter()
        .map(|l| {
            let o = off;
            off += l.len() as u64 + 1;
            (l, o)
        })
        .collect()
}

fn run_one(compression: &str) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let headers = Arc::new(Mutex::new(Vec::new()));
    let (g, h) = (got.clone(), headers.clone());
    let server = Server::start(move |req| {
        h.lock().expect("lock").push(req.clone());
        let body = decode(req);
        let mut g = g.lock().expect("lock");
        for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            g.push(serde_json::from_slice(line).expect("each line is JSON"));
        }
        Reply::Status(200, vec![], b"ok".to_vec())
    });
    std::env::set_var("VOLTAIL_TEST_HTTP_TOKEN", "s3cr3t");
    let cfg = config(&format!(
        "type = \"http\"\nurl = \"{}\"\ncompression = \"{compression}\"\nheaders = {{ X-Api-Key = \"k1\" }}\nauth = {{ type = \"bearer\", token = \"${{VOLTAIL_TEST_HTTP_TOKEN}}\" }}\n",
        server.url("/ingest?x=1")
    ));
    assert!(
        !cfg.to_toml().contains("s3cr3t") && !format!("{cfg:?}").contains("s3cr3t"),
        "secrets never print"
    );
    let mut s = sink(&cfg);
    let f = file(
        1,
        "/var/log/pods/ns1_pod-a_uid/c/0.log",
        &[("namespace", "ns1"), ("pod", "pod-a")],
        0xdead_beef,
    );
    let evs = events(100);
    let ts = Timestamp::now();
    let list: Vec<_> = evs.iter().map(|(l, o)| (&f, l.as_str(), *o)).collect();
    s.send(&batch(cfg.sink(), &list, &ts)).expect("send");
    s.send(&batch(cfg.sink(), &[], &ts))
        .expect("an empty batch sends nothing");
    check_fields(&got.lock().expect("lock"), &evs);
    let reqs = headers.lock().expect("lock");
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.target, "/ingest?x=1");
    assert_eq!(r.header("authorization"), Some("Bearer s3cr3t"));
    assert_eq!(r.header("x-api-key"), Some("k1"));
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let want_enc = match compression {
        "none" => None,
        c => Some(c),
    };
    assert_eq!(r.header("content-encoding"), want_enc);
}

#[test]
fn http_zstd_delivers_every_field() {
    run_one("zstd");
}

#[test]
fn http_gzip_delivers_every_field() {
    run_one("gzip");
}

#[test]
fn http_uncompressed_with_basic_auth_from_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "pa:ss\n").expect("write pw");
    let seen = Arc::new(Mutex::new(None));
    let s2 = seen.clone();
    let server = Server::start(move |req| {
        *s2.lock().expect("lock") = req.header("authorization").map(str::to_string);
        Reply::ok()
    });
    let cfg = config(&format!(
        "type = \"http\"\nurl = \"{}\"\ncompression = \"none\"\nauth = {{ type = \"basic\", user = \"u\", password_file = \"{}\" }}\n",
        server.url("/"),
        pw.display()
    ));
    let mut s = sink(&cfg);
    let f = file(1, "/f", &[], 1);
    s.send(&batch(cfg.sink(), &[(&f, "x", 0)], &Timestamp::now()))
        .expect("send");
    // base64("u:pa:ss")
    assert_eq!(
        seen.lock().expect("lock").as_deref(),
        Some("Basic dTpwYTpzcw==")
    );
}

/// 500, 429 with Retry-After, a 400 with a reason, a response slower than the timeout, a
/// dropped connection: each classified, and after the failures every line arrives exactly once.
#[test]
fn http_failures_are_classified_and_retries_deliver() {
    let script: Arc<Mutex<Vec<Reply>>> = Arc::new(Mutex::new(vec![
        Reply::status(500, "boom"),
        Reply::Status(
            429,
            vec![("Retry-After".into(), "7".into())],
            b"slow down".to_vec(),
        ),
        Reply::Drop,
        Reply::Delay(Duration::from_millis(1500), Box::new(Reply::ok())),
        Reply::status(400, "{\"error\":\"bad field\"}"),
    ]));
    let accepted: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let (sc, acc) = (script.clone(), accepted.clone());
    let server = Server::start(move |req| {
        let next = {
            let mut s = sc.lock().expect("lock");
            if s.is_empty() {
                None
            } else {
                Some(s.remove(0))
            }
        };
        match next {
            Some(r) => r,
            None => {
                let body = decode(req);
                let mut a = acc.lock().expect("lock");
                for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    let v: serde_json::Value = serde_json::from_slice(line).expect("json");
                    *a.entry(v["id"].as_str().expect("id").to_string())
                        .or_default() += 1;
                }
                Reply::ok()
            }
        }
    });
    let cfg = config(&format!(
        "type = \"http\"\nurl = \"{}\"\ntimeout = \"500ms\"\n",
        server.url("/")
    ));
    let mut s = sink(&cfg);
    let f = file(1, "/f", &[], 0xdead_beef);
    let evs = events(50);
    let list: Vec<_> = evs.iter().map(|(l, o)| (&f, l.as_str(), *o)).collect();
    let b = batch(cfg.sink(), &list, &Timestamp::now());

    let e = s.send(&b).expect_err("500");
    assert_eq!((e.kind, e.reason), (SinkErrorKind::Transient, "http_5xx"));
    assert!(e.message.contains("boom"), "{e}");
    let e = s.send(&b).expect_err("429");
    assert_eq!((e.kind, e.reason), (SinkErrorKind::Transient, "http_429"));
    assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
    let e = s.send(&b).expect_err("dropped");
    assert_eq!(e.kind, SinkErrorKind::Transient, "{e}");
    let t = Instant::now();
    let e = s.send(&b).expect_err("slow");
    assert_eq!(
        (e.kind, e.reason),
        (SinkErrorKind::Transient, "timeout"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_millis(1400));
    let e = s.send(&b).expect_err("400");
    assert_eq!((e.kind, e.reason), (SinkErrorKind::Permanent, "http_4xx"));
    assert!(e.message.contains("bad field"), "{e}");
    s.send(&b).expect("the server is back");
    assert_eq!(server.count(), 6);
    let a = accepted.lock().expect("lock");
    assert_eq!(a.len(), 50);
    assert!(a.values().all(|&n| n == 1));
}

#[test]
fn http_connection_refused_is_transient() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let cfg = config(&format!(
        "type = \"http\"\nurl = \"http://127.0.0.1:{port}/\"\ntimeout = \"2s\"\n"
    ));
    let mut s = sink(&cfg);
    let f = file(1, "/f", &[], 1);
    let e = s
        .send(&batch(cfg.sink(), &[(&f, "x", 0)], &Timestamp::now()))
        .expect_err("nobody listens");
    assert_eq!(e.kind, SinkErrorKind::Transient, "{e}");
}

#[test]
fn http_config_errors_name_the_key() {
    let text = "data_dir = \"/tmp/x\"\n[[sources]]\nname = \"app\"\ninclude = [\"/var/log/*.log\"]\n[sink]\ntype = \"http\"\nurl = \"localhost:8080\"\n";
    let e = voltail::config::Config::parse(std::path::Path::new("t.toml"), text)
        .expect_err("bad url")
        .to_string();
    assert!(e.starts_with("t.toml:5: sink.url:"), "{e}");
    let text = text.replace(
        "\"localhost:8080\"",
        "\"http://x\"\nauth = { type = \"bearer\" }",
    );
    let e = voltail::config::Config::parse(std::path::Path::new("t.toml"), &text)
        .expect_err("no token")
        .to_string();
    assert!(e.contains("sink.auth: bearer auth needs"), "{e}");
}

/// HTTPS with a private CA: trusted through `ca_file`, refused (transient) without it.
#[test]
fn http_tls_with_a_custom_ca() {
    let (ca_pem, tls) = tls_pair("127.0.0.1");
    let dir = tempfile::tempdir().expect("tmp");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).expect("write ca");
    let got = Arc::new(Mutex::new(0usize));
    let g = got.clone();
    let server = Server::start_tls(tls, move |req| {
        *g.lock().expect("lock") += decode(req)
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count();
        Reply::ok()
    });
    let url = format!("https://{}/in", server.addr);
    let f = file(1, "/f", &[], 1);
    let ts = Timestamp::now();

    let cfg = config(&format!(
        "type = \"http\"\nurl = \"{url}\"\nca_file = \"{}\"\n",
        ca.display()
    ));
    sink(&cfg)
        .send(&batch(
            cfg.sink(),
            &[(&f, "over tls", 0), (&f, "again", 9)],
            &ts,
        ))
        .expect("trusted through ca_file");
    assert_eq!(*got.lock().expect("lock"), 2);

    let cfg = config(&format!(
        "type = \"http\"\nurl = \"{url}\"\ntimeout = \"5s\"\n"
    ));
    let e = sink(&cfg)
        .send(&batch(cfg.sink(), &[(&f, "x", 0)], &ts))
        .expect_err("unknown issuer");
    assert_eq!(e.kind, SinkErrorKind::Transient, "{e}");
    assert_eq!(*got.lock().expect("lock"), 2);

    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate").expect("write");
    let cfg = config(&format!(
        "type = \"http\"\nurl = \"{url}\"\nca_file = \"{}\"\n",
        bad.display()
    ));
    let e = voltail::sink::build(&cfg)
        .err()
        .expect("no certificate in ca_file");
    assert!(e.message.contains("holds no certificate"), "{e}");
}
