//! The `clickhouse` sink against a real ClickHouse server (Debian's `clickhouse-server`, started
//! here on loopback with its own config, ports and data directory).

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use voltail::batch::Timestamp;
use voltail::sink::SinkErrorKind;

use super::{batch, config, file, lines, sink};

/// A clickhouse-server process; killed when dropped.
pub struct ClickHouse {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

fn binary() -> Option<PathBuf> {
    ["/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl ClickHouse {
    /// Starts a server, or returns `None` (with the reason printed) when it isn't installed
    /// outside CI. Under `CI=true` a missing server fails the test.
    pub fn start() -> Option<ClickHouse> {
        let Some(bin) = binary() else {
            let why = "clickhouse-server is not installed (tests/scripts/sink-deps.sh installs it)";
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            eprintln!("skipping: {why}");
            return None;
        };
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().display();
        let (http, tcp) = (free_port(), free_port());
        let cfg = format!(
            r#"<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/err.log</errorlog><size>10M</size><count>1</count></logger>
  <http_port>{http}</http_port>
  <tcp_port>{tcp}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{d}/data/</path>
  <tmp_path>{d}/tmp/</tmp_path>
  <user_files_path>{d}/user_files/</user_files_path>
  <format_schema_path>{d}/format_schemas/</format_schema_path>
  <mark_cache_size>67108864</mark_cache_size>
  <uncompressed_cache_size>67108864</uncompressed_cache_size>
  <users>
    <default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default>
    <writer><password>w-pass</password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></writer>
  </users>
  <profiles><default></default></profiles>
  <quotas><default></default></quotas>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
</yandex>
"#
        );
        let cfg_path = dir.path().join("config.xml");
        std::fs::write(&cfg_path, cfg).expect("write config");
        let child = Command::new(bin)
            .arg(format!("--config-file={}", cfg_path.display()))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn clickhouse-server");
        let ch = ClickHouse {
            child,
            port: http,
            _dir: dir,
        };
        let t = Instant::now();
        while ch.query("SELECT 1").as_deref() != Ok("1\n") {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "clickhouse-server did not start: {}",
                std::fs::read_to_string(ch._dir.path().join("err.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(ch)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs `sql` and returns the answer's body.
    pub fn query(&self, sql: &str) -> Result<String, String> {
        use std::io::Write;
        let mut s =
            std::net::TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        write!(
            s,
            "POST / HTTP/1.0\r\nHost: x\r\nContent-Length: {}\r\n\r\n{sql}",
            sql.len()
        )
        .map_err(|e| e.to_string())?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
        let (head, body) = resp.split_once("\r\n\r\n").ok_or("no header end")?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Err(format!("{head}\n{body}"));
        }
        Ok(body.to_string())
    }

    pub fn create_table(&self, name: &str) {
        let ddl = voltail::sink::clickhouse::TABLE_SCHEMA.replacen(
            "IF NOT EXISTS logs",
            &format!("IF NOT EXISTS {name}"),
            1,
        );
        self.query(&ddl).expect("create table");
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rows(ch: &ClickHouse, sql: &str) -> Vec<serde_json::Value> {
    ch.query(sql)
        .expect("select")
        .lines()
        .map(|l| serde_json::from_str(l).expect("row json"))
        .collect()
}

/// Two files, three gzip batches, 600 rows: counted and every column compared; the same batch
/// sent again (a retry after a lost answer) is merged away by the documented table.
#[test]
fn clickhouse_rows_arrive_with_every_column() {
    let Some(ch) = ClickHouse::start() else {
        return;
    };
    ch.create_table("logs");
    let cfg = config(&format!(
        "type = \"clickhouse\"\nendpoint = \"{}\"\nauth = {{ type = \"basic\", user = \"writer\", password = \"w-pass\" }}\n",
        ch.endpoint()
    ));
    let mut s = sink(&cfg);
    let a = file(
        1,
        "/var/log/pods/ns1_a/0.log",
        &[("namespace", "ns1"), ("pod", "a")],
        0xa,
    );
    let b = file(
        2,
        "/var/log/pods/ns2_b/0.log",
        &[("namespace", "ns2"), ("pod", "b")],
        0xb,
    );
    let ts = Timestamp::now();
    let ls = lines(600);
    let mut want = Vec::new();
    let mut sent = Vec::new();
    for (chunk_i, chunk) in ls.chunks(200).enumerate() {
        let evs: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let f = if i % 2 == 0 { &a } else { &b };
                let off = (chunk_i * 200 + i) as u64 * 1000;
                want.push((
                    f.path.clone(),
                    off,
                    l.clone(),
                    f.tags.clone(),
                    f.event_id(off),
                ));
                (f, l.as_str(), off)
            })
            .collect();
        let bt = batch(cfg.sink(), &evs, &ts);
        s.send(&bt).expect("insert");
        sent.push(bt);
    }
    s.send(&sent[1]).expect("the same batch again");
    assert_eq!(
        ch.query("SELECT count() FROM logs").expect("count"),
        "800\n"
    );
    assert_eq!(
        ch.query("SELECT count() FROM logs FINAL").expect("count"),
        "600\n"
    );
    let got = rows(
        &ch,
        "SELECT * FROM logs FINAL ORDER BY offset FORMAT JSONEachRow",
    );
    want.sort_by_key(|w| w.1);
    assert_eq!(got.len(), want.len());
    let secs = (ts.unix_nanos / 1_000_000_000) as u64;
    for (g, (path, off, msg, tags, id)) in got.iter().zip(&want) {
        assert_eq!(g["message"], msg.as_str());
        assert_eq!(g["file"], path.as_str());
        assert_eq!(g["source"], "app");
        // ClickHouse quotes 64-bit integers in JSON output.
        assert_eq!(g["offset"], off.to_string());
        assert_eq!(g["timestamp_ns"], (ts.unix_nanos as u64).to_string());
        assert_eq!(g["id"], id.as_str());
        let keys: Vec<_> = tags.iter().map(|(k, _)| k.as_str()).collect();
        let vals: Vec<_> = tags.iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(g["tags.key"], serde_json::json!(keys));
        assert_eq!(g["tags.value"], serde_json::json!(vals));
    }
    assert_eq!(
        ch.query("SELECT DISTINCT toUnixTimestamp(timestamp) FROM logs")
            .expect("ts"),
        format!("{secs}\n")
    );

    // Regression: the documented table was partitioned by day, and ReplacingMergeTree's merges
    // never cross partitions, so an event read again after a restart on the next day (its
    // collection time is new) stayed twice for every query without FINAL, however long the
    // table was left to merge.
    ch.create_table("logs_days");
    let cfg = config(&format!(
        "type = \"clickhouse\"\nendpoint = \"{}\"\ntable = \"logs_days\"\nauth = {{ type = \"basic\", user = \"writer\", password = \"w-pass\" }}\n",
        ch.endpoint()
    ));
    let mut s = sink(&cfg);
    let evs: Vec<_> = ls[..50]
        .iter()
        .enumerate()
        .map(|(i, l)| (&a, l.as_str(), i as u64 * 1000))
        .collect();
    let day = std::time::Duration::from_secs(86_400);
    for t in [
        std::time::SystemTime::now(),
        std::time::SystemTime::now() + day,
    ] {
        s.send(&batch(cfg.sink(), &evs, &Timestamp::at(t)))
            .expect("insert");
    }
    assert_eq!(
        ch.query("OPTIMIZE TABLE logs_days FINAL")
            .and_then(|_| ch.query("SELECT count() FROM logs_days"))
            .expect("count"),
        "50\n",
        "an event sent again a day later is merged away"
    );
}

/// A missing table and a wrong password are permanent, with ClickHouse's reason; a server that
/// is down is transient, and the batch lands once it is back.
#[test]
fn clickhouse_errors_are_classified() {
    let Some(ch) = ClickHouse::start() else {
        return;
    };
    let f = file(1, "/f", &[], 1);
    let ts = Timestamp::now();

    let cfg = config(&format!(
        "type = \"clickhouse\"\nendpoint = \"{}\"\ntable = \"nope\"\ncompression = \"none\"\n",
        ch.endpoint()
    ));
    let mut s = sink(&cfg);
    let e = s
        .send(&batch(cfg.sink(), &[(&f, "x", 0)], &ts))
        .expect_err("no table");
    assert_eq!(e.kind, SinkErrorKind::Permanent, "{e}");
    assert!(e.message.contains("nope"), "{e}");

    ch.create_table("logs");
    let cfg = config(&format!(
        "type = \"clickhouse\"\nendpoint = \"{}\"\nauth = {{ type = \"basic\", user = \"writer\", password = \"wrong\" }}\n",
        ch.endpoint()
    ));
    let e = sink(&cfg)
        .send(&batch(cfg.sink(), &[(&f, "x", 0)], &ts))
        .expect_err("bad password");
    assert_eq!(e.kind, SinkErrorKind::Permanent, "{e}");

    let port = ch.port;
    drop(ch);
    let cfg = config(&format!(
        "type = \"clickhouse\"\nendpoint = \"http://127.0.0.1:{port}\"\ntimeout = \"2s\"\n"
    ));
    let mut s = sink(&cfg);
    let b = batch(cfg.sink(), &[(&f, "x", 0)], &ts);
    let e = s.send(&b).expect_err("server down");
    assert_eq!(e.kind, SinkErrorKind::Transient, "{e}");
}

/// Through the real binary into a real ClickHouse, with a SIGKILL in the middle: every line is
/// in the table, and the documented ReplacingMergeTree holds each exactly once (FINAL).
#[test]
fn e2e_clickhouse_sigkill_loses_nothing_and_final_has_no_duplicates() {
    use super::e2e::{append, wait_for, Voltail};
    let Some(ch) = ClickHouse::start() else {
        return;
    };
    ch.create_table("logs");
    let dir = tempfile::tempdir().expect("tmp");
    let pods = dir.path().join("pods");
    let files: Vec<PathBuf> = (0..2)
        .map(|i| {
            let d = pods.join(format!("ns{i}_pod-{i}_uid/app"));
            std::fs::create_dir_all(&d).expect("mkdir");
            d.join("0.log")
        })
        .collect();
    let per_file = 10_000;
    for (k, f) in files.iter().enumerate() {
        append(f, k, 0, per_file);
    }
    let config = dir.path().join("voltail.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"
checkpoint_interval = "200ms"
probe = "off"
[metrics]
address = ""
[batch]
max_events = 500
linger = "50ms"
queue_batches = 2
[[sources]]
name = "pods"
include = ["{pods}/**/*.log"]
path_tags = '/pods/(?P<namespace>[^_]+)_(?P<pod>[^_]+)_'
poll_interval = "100ms"
discover_interval = "200ms"
[sink]
type = "clickhouse"
endpoint = "{endpoint}"
"#,
            data = dir.path().join("data").display(),
            pods = pods.display(),
            endpoint = ch.endpoint(),
        ),
    )
    .expect("config");
    let log = dir.path().join("voltail.log");
    let count = |sql: &str| -> usize {
        ch.query(sql)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let mut v = Voltail::start(&config, &log);
    wait_for(
        "first rows",
        Duration::from_secs(60),
        || count("SELECT count() FROM logs") >= 4_000,
        &log,
    );
    v.signal(libc::SIGKILL);
    v.wait(Duration::from_secs(10)).expect("killed");
    let mut v = Voltail::start(&config, &log);
    let want = files.len() * per_file;
    wait_for(
        "every row",
        Duration::from_secs(120),
        || count("SELECT uniqExact(id) FROM logs") >= want,
        &log,
    );
    // The first run may have shipped every row before it was killed: then the rows are all
    // there at once, and a SIGTERM sent before the second run installed its handlers would
    // kill it outright. Wait until it is collecting.
    wait_for(
        "the second run collecting",
        Duration::from_secs(60),
        || std::fs::read_to_string(&log).is_ok_and(|l| l.matches("collecting").count() >= 2),
        &log,
    );
    v.signal(libc::SIGTERM);
    assert!(v.wait(Duration::from_secs(30)).expect("exits").success());
    assert_eq!(count("SELECT count() FROM logs FINAL"), want);
    assert_eq!(count("SELECT uniqExact(message) FROM logs"), want);
    assert_eq!(
        count("SELECT uniqExact(tags.value[2]) FROM logs"),
        2,
        "pod tags"
    );
    eprintln!(
        "e2e clickhouse: {want} lines, {} rows before merging",
        count("SELECT count() FROM logs")
    );
}
