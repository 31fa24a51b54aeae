//! Helpers for the integration tests: build and run the real `voltail` binary against real
//! directories, read its file sink back, and scrape its metrics endpoint.
//!
//! Nothing here is mocked: the collector is the release or debug binary built from this
//! workspace, the files are real files in temporary directories, the metrics come over TCP.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One event read back from the file sink.
#[derive(Debug, Clone, serde::Deserialize, PartialEq, Eq)]
pub struct Event {
    /// Collection time.
    pub timestamp: String,
    /// The line.
    pub message: String,
    /// Source name.
    pub source: String,
    /// File path.
    pub file: String,
    /// Offset of the line in the file.
    pub offset: u64,
    /// Path tags.
    pub tags: HashMap<String, String>,
}

/// The `voltail` binary, built once per test run.
pub fn voltail_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/<test binary> -> target/<profile>/voltail
        let exe = std::env::current_exe().expect("current exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "voltail", "--bin", "voltail"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build of voltail failed");
        profile_dir.join("voltail")
    })
    .clone()
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A test setup: pod directories, a data dir, a sink dir, a config.
#[derive(Debug)]
pub struct Setup {
    /// Keeps the directory alive.
    pub tmp: tempfile::TempDir,
    /// `<tmp>/logs`: the shared volume.
    pub logs: PathBuf,
    /// `<tmp>/data`: data_dir.
    pub data: PathBuf,
    /// `<tmp>/out`: the file sink.
    pub out: PathBuf,
    /// Metrics port.
    pub port: u16,
}

impl Setup {
    /// A new empty setup.
    pub fn new() -> Setup {
        Setup::new_in(&std::env::temp_dir())
    }

    /// A new empty setup under `dir` (e.g. a tmpfs, a device of its own).
    pub fn new_in(dir: &Path) -> Setup {
        let tmp = tempfile::tempdir_in(dir).expect("tmp");
        let logs = tmp.path().join("logs");
        std::fs::create_dir_all(&logs).expect("mkdir logs");
        Setup {
            logs,
            data: tmp.path().join("data"),
            out: tmp.path().join("out"),
            port: free_port(),
            tmp,
        }
    }

    /// Writes a config with the standard pod layout and `extra` appended to the source and
    /// `sink_extra` to the sink; returns its path.
    pub fn config(&self, extra: &str, sink_extra: &str) -> PathBuf {
        let text = format!(
            r#"data_dir = "{data}"
checkpoint_interval = "200ms"
shutdown_timeout = "10s"
probe = "off"
[metrics]
address = "127.0.0.1:{port}"
[batch]
linger = "50ms"
[[sources]]
name = "nginx"
include = ["{logs}/*/*/access.log"]
exclude = ["**/*.gz"]
path_tags = '^{logs}/(?P<app>[^/]+)/(?P<namespace>[^_]+)_(?P<pod>[^_]+)_(?P<pod_ip>[^_]+)_(?P<node_ip>[^_]+)_(?P<node>[^/]+)/'
poll_interval = "100ms"
max_poll_interval = "500ms"
discover_interval = "300ms"
rotate_wait = "1s"
flush_partial_after = "1s"
{extra}
[sink]
type = "file"
path = "{out}"
{sink_extra}
"#,
            data = self.data.display(),
            port = self.port,
            logs = self.logs.display(),
            out = self.out.display(),
        );
        let p = self.tmp.path().join("voltail.toml");
        std::fs::write(&p, text).expect("write config");
        p
    }

    /// Every event in the sink, in segment order.
    pub fn sink(&self) -> Vec<Event> {
        read_sink(&self.out)
    }
}

impl Default for Setup {
    fn default() -> Self {
        Setup::new()
    }
}

/// Reads every segment of a file sink directory (a torn last frame is ignored, and a segment
/// removed between listing and reading is skipped, as a consumer would).
pub fn read_sink(dir: &Path) -> Vec<Event> {
    let mut segs: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains("voltail-"))
            .collect(),
        Err(_) => return Vec::new(),
    };
    segs.sort();
    let mut out = Vec::new();
    for s in segs {
        let raw = match std::fs::read(&s) {
            Ok(raw) => raw,
            // A collector starting up removes the segments written after its checkpoint (their
            // lines are read again): a consumer polling the directory sees them vanish.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("read segment {}: {e}", s.display()),
        };
        let text = if s.to_string_lossy().ends_with(".zst") {
            let mut dec = zstd::stream::read::Decoder::new(&raw[..]).expect("decoder");
            let mut buf = Vec::new();
            let _ = dec.read_to_end(&mut buf);
            buf
        } else {
            raw
        };
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<Event>(line) {
                Ok(e) => out.push(e),
                Err(e) => panic!(
                    "bad JSON line in {}: {e}: {}",
                    s.display(),
                    String::from_utf8_lossy(line)
                ),
            }
        }
    }
    out
}

/// A running collector.
#[derive(Debug)]
pub struct Collector {
    /// The process.
    pub child: Child,
    /// Its stderr log.
    pub log: PathBuf,
    /// Metrics port.
    pub port: u16,
}

impl Collector {
    /// Starts `voltail run --config cfg`.
    pub fn start(cfg: &Path, port: u16) -> Collector {
        Collector::start_env(cfg, port, &[])
    }

    /// Starts `voltail run --config cfg` with extra environment variables (e.g. an
    /// `LD_PRELOAD` that fakes the clock).
    pub fn start_env(cfg: &Path, port: u16, env: &[(&str, &str)]) -> Collector {
        let log = cfg.with_extension(format!("log.{}", fastrand::u32(..)));
        let f = std::fs::File::create(&log).expect("log file");
        let child = Command::new(voltail_bin())
            .args(["run", "--config"])
            .arg(cfg)
            .env("VOLTAIL_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn voltail");
        Collector { child, log, port }
    }

    /// GET `path` from the metrics endpoint.
    pub fn get(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut r = String::new();
        s.read_to_string(&mut r).ok()?;
        r.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    }

    /// The value of a metric (first series whose name and labels start with `name`).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let body = self.get("/metrics")?;
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Waits until `voltail_read_lines_total` reaches `n`.
    pub fn wait_lines(&self, n: u64, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self
                .metric("voltail_read_lines_total")
                .is_some_and(|v| v as u64 >= n)
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Waits until `/health` answers (the process is up).
    pub fn wait_up(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.get("/health").is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        false
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(mut self) -> i32 {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().expect("wait");
        st.code().unwrap_or(-1)
    }

    /// SIGKILL and wait.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn child_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.status_kib("VmHWM:")
    }

    /// Resident memory now (VmRSS) in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS:")
    }

    fn status_kib(&self, field: &str) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        s.lines()
            .find(|l| l.starts_with(field))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks that every line of every file under `logs` whose name matches `keep` is in
/// `events` exactly once, at its offset, and that nothing else is there. Returns the number of
/// lines checked.
pub fn assert_exactly_once(events: &[Event], files: &[PathBuf]) -> usize {
    let mut want: HashMap<(String, u64), String> = HashMap::new();
    for f in files {
        let text = std::fs::read(f).expect("read log");
        let mut off = 0u64;
        for line in text.split_inclusive(|&b| b == b'\n') {
            if line.ends_with(b"\n") {
                let msg = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                want.insert((f.display().to_string(), off), msg);
            }
            off += line.len() as u64;
        }
    }
    let mut seen: HashMap<(String, u64), usize> = HashMap::new();
    for e in events {
        let k = (e.file.clone(), e.offset);
        *seen.entry(k.clone()).or_default() += 1;
        match want.get(&k) {
            Some(m) => assert_eq!(m, &e.message, "wrong message at {}:{}", e.file, e.offset),
            None => panic!("unexpected event {}:{} {:?}", e.file, e.offset, e.message),
        }
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(dups.is_empty(), "duplicates: {dups:?}");
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !seen.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "{} lines missing, e.g. {missing:?}",
        want.len() - seen.len()
    );
    want.len()
}

/// All `access.log*` files under `dir`, recursively.
pub fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("access.log"))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Writes `lines` nginx-like lines into each of `pods` pod-style directories under `root`
/// (appending to what is there), as fast as possible.
pub fn gen(root: &Path, pods: usize, lines: u64, seed: u64) {
    let o = voltail::generate::GenerateOptions {
        dir: root.to_path_buf(),
        pod_dir: None,
        pods,
        rate: 0,
        lines,
        app: "nginx".into(),
        file: "access.log".into(),
        rotate_bytes: 0,
        seed,
    };
    voltail::generate::run(&o, &std::sync::atomic::AtomicBool::new(false)).expect("generate");
}

/// Whether tests that need privileges or special kernel features must run (CI) rather than
/// skip with a reason.
pub fn must_run() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
