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
    let files: Vec<PathBuf> = super::pod_files(&pods, 3);
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

/// Line `i` of file `k` for the outage test: about 550 bytes on average, so that a backlog of
/// many MiB is a few hundred thousand lines; its padding is a function of `(k, i)`, so the
/// backend checks every message it receives without keeping them.
fn outage_line(k: usize, i: u64) -> String {
    let pad = (i.wrapping_mul(7919) % 900 + 100) as usize;
    let c = char::from(b'a' + ((i + k as u64) % 26) as u8);
    format!("file {k} line {i:09} {}", c.to_string().repeat(pad))
}

/// What the outage backend received: which `(file, line)` pairs, and how many deliveries.
#[derive(Default)]
struct Received {
    seen: std::collections::HashSet<(usize, u64)>,
    deliveries: usize,
}

fn receive(r: &Mutex<Received>, req: &Request) -> Reply {
    let body = match req.header("content-encoding") {
        Some("zstd") => zstd::decode_all(&req.body[..]).expect("zstd body"),
        _ => req.body.clone(),
    };
    let mut got = Vec::new();
    for line in body.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line).expect("json line");
        let msg = v["message"].as_str().expect("message");
        let mut w = msg.split(' ');
        let k: usize = w.nth(1).and_then(|x| x.parse().ok()).expect("file number");
        let i: u64 = w.nth(1).and_then(|x| x.parse().ok()).expect("line number");
        assert_eq!(msg, outage_line(k, i), "message intact");
        got.push((k, i));
    }
    let mut r = r.lock().expect("lock");
    r.deliveries += got.len();
    r.seen.extend(got);
    Reply::Status(204, vec![], vec![])
}

/// One sample of the collector while the backend comes and goes.
struct Sample {
    t: Duration,
    phase: &'static str,
    rss_kib: u64,
    lag: u64,
    delivered: usize,
}

/// The backend goes away (its port closed: connection refused) for `VOLTAIL_OUTAGE_SECS`
/// (default 10) under a steady writer that adds `VOLTAIL_OUTAGE_MIB` (default 192) during it,
/// and comes back. The collector's RSS stays under twice its pre-outage value plus 32 MiB
/// (the backlog alone is larger, so buffering it in memory fails the test), the lag gauge
/// rises by about what was written and returns to 0, and every line arrives.
#[test]
fn e2e_http_backend_gone_memory_stays_bounded_and_lag_drains() {
    use voltail_tests::Collector;
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let outage = Duration::from_secs(env("VOLTAIL_OUTAGE_SECS", 10));
    let backlog_mib = env("VOLTAIL_OUTAGE_MIB", 192);
    // Bytes per second that put `backlog_mib` on disk during the outage.
    let rate = (backlog_mib << 20) / outage.as_secs().max(1);
    let dir = tempfile::tempdir().expect("tmp");
    let pods = dir.path().join("pods");
    const FILES: usize = 4;
    let files: Vec<PathBuf> = super::pod_files(&pods, FILES);
    let received = Arc::new(Mutex::new(Received::default()));
    let r2 = received.clone();
    let server = Server::start(move |req| receive(&r2, req));
    let addr = server.addr;
    let port = voltail_tests::free_port();
    let config = dir.path().join("voltail.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"
checkpoint_interval = "1s"
shutdown_timeout = "5s"
probe = "off"
[metrics]
address = "127.0.0.1:{port}"
# Half the default batch: what the queues may hold (2 queues x 8 batches) stays well inside
# the bound below, whose slack is 32 MiB; the backlog is what must not be held.
[batch]
max_bytes = 524288
[[sources]]
name = "pods"
include = ["{pods}/**/*.log"]
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

    // Built before the writer starts, so that the writer's clock and the collector's agree.
    voltail_tests::voltail_bin();
    // The steady writer: `rate` bytes per second over the files, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (files, stop, written) = (files.clone(), stop.clone(), written.clone());
        std::thread::spawn(move || {
            let mut out: Vec<std::fs::File> = files
                .iter()
                .map(|p| {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .expect("open log")
                })
                .collect();
            let mut next = vec![0u64; FILES];
            let (t0, mut bytes) = (Instant::now(), 0u64);
            let mut k = 0;
            while !stop.load(Ordering::SeqCst) {
                let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64;
                let mut buf = String::new();
                while bytes + (buf.len() as u64) < due {
                    buf.push_str(&outage_line(k, next[k]));
                    buf.push('\n');
                    next[k] += 1;
                    if buf.len() > 64 << 10 {
                        out[k].write_all(buf.as_bytes()).expect("append");
                        bytes += buf.len() as u64;
                        buf.clear();
                        k = (k + 1) % FILES;
                    }
                }
                if !buf.is_empty() {
                    out[k].write_all(buf.as_bytes()).expect("append");
                    bytes += buf.len() as u64;
                    k = (k + 1) % FILES;
                }
                written.store(bytes, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
            next
        })
    };

    let mut c = Collector::start(&config, port);
    let t0 = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let delivered = || received.lock().expect("lock").seen.len();
    let lag = |c: &Collector| c.metric("voltail_lag_bytes").map_or(0, |v| v as u64);
    let sample = |c: &Collector, phase, samples: &mut Vec<Sample>| {
        samples.push(Sample {
            t: t0.elapsed(),
            phase,
            rss_kib: c.rss_kib().unwrap_or(0),
            lag: lag(c),
            delivered: delivered(),
        });
    };
    let run = |c: &Collector, phase, d: Duration, samples: &mut Vec<Sample>| {
        let end = Instant::now() + d;
        while Instant::now() < end {
            sample(c, phase, samples);
            std::thread::sleep(Duration::from_millis(250));
        }
    };

    // 1. Up: the collector keeps up with the writer; its RSS there is the reference.
    assert!(c.wait_up(Duration::from_secs(30)), "{}", c.log_text());
    run(&c, "up", Duration::from_secs(5), &mut samples);
    assert!(
        delivered() > 0,
        "lines flow before the outage: {}",
        c.log_text()
    );
    let pre_rss = samples
        .iter()
        .rev()
        .take(8)
        .map(|s| s.rss_kib)
        .max()
        .unwrap_or(0);
    let pre_lag = lag(&c);

    // 2. Gone: the port is closed; the writer goes on.
    drop(server);
    let written_at_outage = written.load(Ordering::SeqCst);
    let delivered_at_outage = delivered();
    run(&c, "down", outage, &mut samples);
    let written_in_outage = written.load(Ordering::SeqCst) - written_at_outage;
    let outage_lag = lag(&c);
    assert!(
        c.child_running(),
        "the collector survives the outage:\n{}",
        c.log_text()
    );

    // 3. Back on the same address; the writer goes on a little, then stops; all drains.
    let r2 = received.clone();
    let _server = Server::start_at(addr, move |req| receive(&r2, req));
    run(&c, "back", Duration::from_secs(2), &mut samples);
    stop.store(true, Ordering::SeqCst);
    let counts = writer.join().expect("writer");
    let total: u64 = counts.iter().sum();
    let drain = Instant::now() + Duration::from_secs(180);
    loop {
        sample(&c, "drain", &mut samples);
        let s = samples.last().expect("a sample");
        if s.delivered as u64 >= total && s.lag == 0 {
            break;
        }
        assert!(
            Instant::now() < drain,
            "not drained: {} of {total} lines, lag {} B; log:\n{}",
            s.delivered,
            s.lag,
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    let max_rss = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let max_lag = samples.iter().map(|s| s.lag).max().unwrap_or(0);
    let peak = c.peak_rss_kib().unwrap_or(0);
    let log = c.log_text();
    assert_eq!(c.stop(), 0, "SIGTERM exits 0");
    eprintln!("   t (s) phase   RSS (KiB)     lag (B)  delivered");
    for s in samples.iter().step_by(4) {
        eprintln!(
            "{:>8.1} {:<5} {:>11} {:>11} {:>10}",
            s.t.as_secs_f64(),
            s.phase,
            s.rss_kib,
            s.lag,
            s.delivered
        );
    }
    let r = received.lock().expect("lock");
    eprintln!(
        "e2e outage: {outage:?} down, {} MiB written meanwhile ({} MiB/s), {total} lines; RSS \
         before {pre_rss} KiB, max sampled {max_rss} KiB, peak (VmHWM) {peak} KiB; lag before \
         {pre_lag} B, at the end of the outage {outage_lag} B, max {max_lag} B; {} delivered \
         before the outage, {} deliveries in all ({} again)",
        written_in_outage >> 20,
        rate >> 20,
        delivered_at_outage,
        r.deliveries,
        r.deliveries - r.seen.len(),
    );
    let bound = 2 * pre_rss + 32 * 1024;
    assert!(
        written_in_outage / 1024 > bound,
        "the outage backlog ({} KiB) must exceed the RSS bound ({bound} KiB), or the bound \
         proves nothing: raise VOLTAIL_OUTAGE_MIB",
        written_in_outage / 1024
    );
    assert!(
        max_rss < bound && peak < bound,
        "RSS {max_rss} KiB (peak {peak} KiB) above 2 x {pre_rss} KiB + 32 MiB"
    );
    assert!(
        outage_lag >= pre_lag + written_in_outage / 2,
        "lag rose by less than half of the {written_in_outage} B written while the backend \
         was gone: {pre_lag} -> {outage_lag} B"
    );
    let missing: Vec<(usize, u64)> = counts
        .iter()
        .enumerate()
        .flat_map(|(k, &n)| (0..n).map(move |i| (k, i)))
        .filter(|p| !r.seen.contains(p))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "lines never delivered, e.g. {missing:?}"
    );
    assert_eq!(r.seen.len() as u64, total, "nothing unexpected");
    assert!(!log.contains(" ERROR "), "no data put at risk; log:\n{log}");
}
