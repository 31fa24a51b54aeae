//! End to end through the real `voltail` binary: pod log files -> voltail -> a backend that
//! deduplicates by the event id (the http sink's `id`), with a backend outage and a SIGKILL.
//! Every line must arrive at least once, and the backend, keyed by id, holds each exactly once.
//!
//! The binary is built on first use with `cargo build -p voltail --bin voltail` into the same
//! target directory and profile as this test binary.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::server::{Reply, Request, Server};

/// The `voltail` binary of this profile, built once.
pub fn voltail_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // <target>/<profile>/deps/integration-<hash>
        let exe = std::env::current_exe().expect("current exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in <target>/<profile>/deps");
        let target = profile_dir.parent().expect("target dir");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // Cargo sets CARGO_* variables for the test; build scripts that watch the environment
        // would see them and rebuild (ring, every run), so the inner build starts clean of them.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("CARGO_") && k != "CARGO_HOME" {
                cmd.env_remove(&k);
            }
        }
        cmd.args(["build", "--quiet", "-p", "voltail", "--bin", "voltail"])
            .env("CARGO_TARGET_DIR", target)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "cargo build -p voltail failed");
        let bin = profile_dir.join("voltail");
        assert!(bin.exists(), "{} was not built", bin.display());
        bin
    })
    .clone()
}

/// A running voltail; SIGKILLed if still running when dropped.
pub struct Voltail(pub Child);

impl Voltail {
    pub fn start(config: &Path, log: &Path) -> Voltail {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = Command::new(voltail_bin())
            .args(["run", "--config"])
            .arg(config)
            .env("VOLTAIL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn voltail");
        Voltail(child)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        let r = unsafe { libc::kill(self.0.id() as i32, sig) };
        assert_eq!(r, 0, "kill");
    }

    pub fn wait(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < within {
            if let Some(st) = self.0.try_wait().expect("try_wait") {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Voltail {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The backend: documents by id, every delivery counted; answers 503 while `down`.
#[derive(Default)]
struct Backend {
    by_id: HashMap<String, String>,
    deliveries: usize,
}

fn handle(b: &Mutex<Backend>, down: &AtomicBool, req: &Request) -> Reply {
    if down.load(Ordering::SeqCst) {
        return Reply::Status(
            503,
            vec![("Retry-After".into(), "1".into())],
            b"down".to_vec(),
        );
    }
    let body = zstd::decode_all(&req.body[..]).expect("zstd body");
    let mut b = b.lock().expect("lock");
    for line in body.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line).expect("json line");
        let id = v["id"].as_str().expect("id").to_string();
        let msg = v["message"].as_str().expect("message").to_string();
        b.deliveries += 1;
        if let Some(old) = b.by_id.insert(id, msg.clone()) {
            assert_eq!(old, msg, "one id, one line");
        }
    }
    Reply::Status(204, vec![], vec![])
}

/// Lines `from..to` of file `k`. Files must differ from their first bytes on: the event id is
/// fingerprint + offset, so files with the same first 256 bytes share ids.
pub fn append(path: &Path, k: usize, from: usize, to: usize) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open log");
    let mut buf = String::new();
    for i in from..to {
        buf.push_str(&format!("file {k} line {i:07} {}\n", "x".repeat(i % 97)));
    }
    f.write_all(buf.as_bytes()).expect("append");
}

pub fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool, log: &Path) {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() > within {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "timed out waiting for {what}; voltail's log ends with:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Outage then SIGKILL then recovery, through the http sink. The outage length is
/// `VOLTAIL_E2E_OUTAGE_SECS` (default 5; the issue's 5-minute outage is `300`).
#[test]
fn e2e_http_outage_and_sigkill_lose_nothing() {
    let outage = Duration::from_secs(
        std::env::var("VOLTAIL_E2E_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5),
    );
    let dir = tempfile::tempdir().expect("tmp");
    let pods = dir.path().join("pods");
    let files: Vec<PathBuf> = (0..3)
        .map(|i| {
            let d = pods.join(format!("ns1_pod-{i}_uid{i}/app"));
            std::fs::create_dir_all(&d).expect("mkdir");
            d.join("0.log")
        })
        .collect();
    let per_file = 20_000;
    for (k, f) in files.iter().enumerate() {
        append(f, k, 0, per_file / 2);
    }
    let backend = Arc::new(Mutex::new(Backend::default()));
    let down = Arc::new(AtomicBool::new(false));
    let (b2, d2) = (backend.clone(), down.clone());
    let server = Server::start(move |req| handle(&b2, &d2, req));
    let config = dir.path().join("voltail.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"
checkpoint_interval = "200ms"
shutdown_timeout = "5s"
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
type = "http"
url = "{url}"
timeout = "5s"
"#,
            data = dir.path().join("data").display(),
            pods = pods.display(),
            url = server.url("/ingest"),
        ),
    )
    .expect("write config");
    let log = dir.path().join("voltail.log");
    let delivered = || backend.lock().expect("lock").by_id.len();
    let dump = || std::fs::read_to_string(&log).unwrap_or_default();

    // 1. Up: some lines flow, then SIGKILL in the middle of the stream.
    let mut v = Voltail::start(&config, &log);
    wait_for(
        "first deliveries",
        Duration::from_secs(60),
        || delivered() >= 5_000,
        &log,
    );
    v.signal(libc::SIGKILL);
    v.wait(Duration::from_secs(10)).expect("killed");
    let before_outage = backend.lock().expect("lock").deliveries;

    // 2. Down: restart during the outage; more lines are written; nothing is accepted.
    down.store(true, Ordering::SeqCst);
    let mut v = Voltail::start(&config, &log);
    for (k, f) in files.iter().enumerate() {
        append(f, k, per_file / 2, per_file);
    }
    std::thread::sleep(outage);
    assert_eq!(
        backend.lock().expect("lock").deliveries,
        before_outage,
        "nothing is accepted while down"
    );
    assert!(
        v.0.try_wait().expect("try_wait").is_none(),
        "voltail survives the outage:\n{}",
        dump()
    );

    // 3. Back: everything arrives; SIGTERM exits cleanly.
    down.store(false, Ordering::SeqCst);
    let want = files.len() * per_file;
    wait_for(
        "every line",
        Duration::from_secs(30),
        || delivered() >= want,
        &log,
    );
    eprintln!("all {want} delivered");
    v.signal(libc::SIGTERM);
    let st = v.wait(Duration::from_secs(30)).expect("exits on SIGTERM");
    assert!(st.success(), "exit status {st}:\n{}", dump());

    let b = backend.lock().expect("lock");
    assert_eq!(b.by_id.len(), want, "each line once by id");
    let mut msgs: Vec<&String> = b.by_id.values().collect();
    msgs.sort();
    msgs.dedup();
    assert_eq!(msgs.len(), want, "every line, each once");
    eprintln!(
        "e2e http: {} lines, {} deliveries ({} re-sent after the SIGKILL)",
        want,
        b.deliveries,
        b.deliveries - want
    );
}
