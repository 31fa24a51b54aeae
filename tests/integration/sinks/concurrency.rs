//! `concurrency` through the real binary: the http sink against a slow backend sees exactly N
//! requests at once, and the checkpoint on disk never covers a line the backend has not
//! acknowledged, across a SIGKILL and a restart; in the end every line is there.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::e2e::{append, wait_for, Voltail};
use super::server::{Reply, Server};

/// Lines the backend answered 2xx for, by (file, offset); and the concurrency it saw.
#[derive(Default)]
struct Backend {
    acked: Mutex<HashSet<(String, u64)>>,
    active: AtomicUsize,
    peak: AtomicUsize,
    requests: AtomicUsize,
}

/// Line start offsets of `path` (written by [`append`]).
fn line_offsets(path: &Path) -> Vec<u64> {
    let data = std::fs::read(path).expect("read log");
    let mut offs = vec![0];
    for (i, &b) in data.iter().enumerate() {
        if b == b'\n' && i + 1 < data.len() {
            offs.push(i as u64 + 1);
        }
    }
    offs
}

/// Checks that every line below each checkpointed offset is acknowledged; returns how many
/// lines the checkpoint covers.
fn check_checkpoint(data: &Path, files: &[PathBuf], backend: &Backend) -> usize {
    let Ok(loaded) = voltail::checkpoint::read_only(data) else {
        return 0;
    };
    // Acknowledgements only grow: taking them after the checkpoint can only help it.
    let acked = backend.acked.lock().expect("lock").clone();
    let mut covered = 0;
    for e in &loaded.entries {
        let Some(f) = files.iter().find(|f| f.to_string_lossy() == e.path) else {
            continue;
        };
        for off in line_offsets(f).into_iter().filter(|&o| o < e.offset) {
            assert!(
                acked.contains(&(e.path.clone(), off)),
                "checkpoint of {} at {} covers line {off}, which the backend never acknowledged",
                e.path,
                e.offset
            );
            covered += 1;
        }
    }
    covered
}

#[test]
fn concurrency_n_requests_in_flight_and_checkpoint_never_ahead() {
    const N: usize = 3;
    let dir = tempfile::tempdir().expect("tmp");
    let pods = dir.path().join("pods");
    let files: Vec<PathBuf> = super::pod_files(&pods, 2);
    let per_file = 40_000;
    for (k, f) in files.iter().enumerate() {
        append(f, k, 0, per_file);
    }
    let backend = Arc::new(Backend::default());
    let b2 = backend.clone();
    let server = Server::start(move |req| {
        let now = b2.active.fetch_add(1, Ordering::SeqCst) + 1;
        b2.peak.fetch_max(now, Ordering::SeqCst);
        // A slow backend, 60-340 ms an answer: only concurrency keeps up, and answers come
        // back out of order.
        let n = b2.requests.fetch_add(1, Ordering::SeqCst) as u64;
        std::thread::sleep(Duration::from_millis(60 + n * 97 % 281));
        let body = zstd::decode_all(&req.body[..]).expect("zstd body");
        let mut lines = Vec::new();
        for line in body.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_slice(line).expect("json line");
            let file = v["file"].as_str().expect("file").to_string();
            lines.push((file, v["offset"].as_u64().expect("offset")));
        }
        b2.acked.lock().expect("lock").extend(lines);
        b2.active.fetch_sub(1, Ordering::SeqCst);
        Reply::Status(204, vec![], vec![])
    });
    let data = dir.path().join("data");
    let config = dir.path().join("voltail.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"
checkpoint_interval = "100ms"
shutdown_timeout = "10s"
probe = "off"
[metrics]
address = ""
[batch]
max_events = 200
linger = "20ms"
queue_batches = 2
[[sources]]
name = "pods"
include = ["{pods}/**/*.log"]
poll_interval = "100ms"
discover_interval = "200ms"
[sink]
type = "http"
url = "{url}"
timeout = "10s"
concurrency = {N}
"#,
            data = data.display(),
            pods = pods.display(),
            url = server.url("/ingest"),
        ),
    )
    .expect("write config");
    let log = dir.path().join("voltail.log");
    let want = files.len() * per_file;
    let delivered = || backend.acked.lock().expect("lock").len();

    // A watcher compares the checkpoint with the acknowledgements all along.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, backend, data, files) =
            (stop.clone(), backend.clone(), data.clone(), files.clone());
        std::thread::spawn(move || {
            let mut checks = 0;
            while !stop.load(Ordering::SeqCst) {
                check_checkpoint(&data, &files, &backend);
                checks += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            checks
        })
    };

    // 1. Run until the backend has seen N at once and a third of the lines; SIGKILL.
    let mut v = Voltail::start(&config, &log);
    wait_for(
        "a third of the lines",
        Duration::from_secs(60),
        || delivered() >= want / 3,
        &log,
    );
    v.signal(libc::SIGKILL);
    v.wait(Duration::from_secs(10)).expect("killed");
    // The killed process's last requests are still being answered: let them finish, so the
    // restarted one's concurrency is measured on its own.
    wait_for(
        "the killed process's requests to end",
        Duration::from_secs(10),
        || backend.active.load(Ordering::SeqCst) == 0,
        &log,
    );
    let first_peak = backend.peak.swap(0, Ordering::SeqCst);
    assert_eq!(
        first_peak, N,
        "the backend saw exactly `concurrency` requests at once"
    );
    let covered = check_checkpoint(&data, &files, &backend);
    assert!(covered > 0, "the checkpoint moved before the kill");
    eprintln!(
        "killed with {} lines acknowledged, {covered} checkpointed",
        delivered()
    );

    // 2. Restart: the rest arrives, nothing is lost.
    let mut v = Voltail::start(&config, &log);
    wait_for(
        "every line",
        Duration::from_secs(60),
        || delivered() >= want,
        &log,
    );
    v.signal(libc::SIGTERM);
    let st = v.wait(Duration::from_secs(30)).expect("exits on SIGTERM");
    assert!(st.success(), "exit status {st}");
    stop.store(true, Ordering::SeqCst);
    let checks = watcher.join().expect("watcher");
    assert_eq!(
        check_checkpoint(&data, &files, &backend),
        want,
        "all checkpointed"
    );

    let acked = backend.acked.lock().expect("lock");
    let mut per: HashMap<&str, usize> = HashMap::new();
    for (f, _) in acked.iter() {
        *per.entry(f.as_str()).or_default() += 1;
    }
    for f in &files {
        assert_eq!(
            per.get(&*f.to_string_lossy()),
            Some(&per_file),
            "{}",
            f.display()
        );
    }
    assert_eq!(
        backend.peak.load(Ordering::SeqCst),
        N,
        "after the restart too"
    );
    eprintln!("concurrency {N}: {want} lines, {checks} checkpoint checks");
}
