//! Shard hand-over with real processes: two `voltail run` replicas (`shard = "0/2"`, `"1/2"`)
//! share the pod directories of one volume, then grow to three following the procedure of
//! docs/operations.md ("Growing N"): stop every replica, `voltail reshard --count 3` once,
//! start the new count. Writers keep appending throughout; in the end every line
//! written must have been delivered exactly once across all replicas' sinks.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Test plumbing errors (IO, JSON); what the test checks is asserted.
type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

use voltail::config::Shard;
use voltail::discovery::in_shard;

const PODS: usize = 12;

fn pod_dir(logs: &Path, i: usize) -> PathBuf {
    logs.join(format!("voltail_writer-{i}_10.0.0.{i}_192.0.2.1_node-a"))
}

fn config(root: &Path, shard: &str, ordinal: usize) -> Result<PathBuf> {
    let data_dir = root.join("shards").join(format!("voltail-{ordinal}"));
    let text = format!(
        r#"data_dir = "{data}"
shard = "{shard}"
checkpoint_interval = "200ms"
shutdown_timeout = "10s"
probe = "off"
[metrics]
address = "127.0.0.1:0"
[[sources]]
name = "nginx"
include = ["{logs}/*/access.log"]
path_tags = '/(?P<namespace>[^_/]+)_(?P<pod>[^_]+)_(?P<pod_ip>[^_]+)_(?P<node_ip>[^_]+)_(?P<node>[^/]+)/access.log$'
poll_interval = "100ms"
discover_interval = "200ms"
[sink]
type = "file"
path = "{data}/out"
compression = "zstd"
"#,
        data = data_dir.display(),
        logs = root.join("logs/nginx").display(),
    );
    let path = root.join(format!("voltail-{ordinal}-of-{}.toml", shard_count(shard)));
    std::fs::write(&path, text)?;
    Ok(path)
}

fn shard_count(shard: &str) -> &str {
    shard.rsplit('/').next().unwrap_or(shard)
}

struct Replica {
    child: Child,
    name: String,
}

fn start(bin: &Path, cfg: &Path, name: &str, root: &Path) -> Result<Replica> {
    let log = std::fs::File::create(root.join(format!("{name}.log")))?;
    let child = Command::new(bin)
        .args(["run", "--config"])
        .arg(cfg)
        .env("VOLTAIL_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    Ok(Replica {
        child,
        name: name.to_string(),
    })
}

/// SIGTERM, then wait for a clean exit (the drain and the last checkpoint happen here).
fn stop(mut r: Replica, root: &Path) -> Result<()> {
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    let rc = unsafe { libc::kill(r.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(
        rc,
        0,
        "kill {}: {}",
        r.name,
        std::io::Error::last_os_error()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = r.child.try_wait()? {
            let log = std::fs::read_to_string(root.join(format!("{}.log", r.name)))?;
            assert!(status.success(), "{} exited with {status}:\n{log}", r.name);
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = r.child.kill();
            panic!("{} did not stop within 30s of SIGTERM", r.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Appends "pod=<i> seq=<n>" lines to every pod's access.log until `stop`; returns the counts.
fn writer(logs: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Result<Vec<u64>>> {
    std::thread::spawn(move || {
        let mut files = Vec::new();
        for i in 0..PODS {
            let d = pod_dir(&logs, i);
            std::fs::create_dir_all(&d)?;
            files.push(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(d.join("access.log"))?,
            );
        }
        let mut written = vec![0u64; PODS];
        while !stop.load(Ordering::Relaxed) {
            for (i, f) in files.iter_mut().enumerate() {
                let mut buf = String::new();
                for _ in 0..5 {
                    buf.push_str(&format!(
                        "pod={i} seq={} GET /api/v1/orders HTTP/1.1 200\n",
                        written[i]
                    ));
                    written[i] += 1;
                }
                f.write_all(buf.as_bytes())?;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(written)
    })
}

/// Every event in every replica's file sink: (pod, seq) -> times delivered.
fn delivered(root: &Path) -> Result<HashMap<(usize, u64), u32>> {
    let mut seen = HashMap::new();
    for shard in std::fs::read_dir(root.join("shards"))? {
        let out = shard?.path().join("out");
        let Ok(rd) = std::fs::read_dir(&out) else {
            continue;
        };
        for seg in rd {
            let seg = seg?.path();
            let raw = match std::fs::read(&seg) {
                Ok(raw) => raw,
                // A replica starting up removes segments written after its checkpoint.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            let text = if seg.extension().is_some_and(|e| e == "zst") {
                // A segment being written may end in a partial frame: decode whole frames only.
                let mut out = Vec::new();
                let mut dec = zstd::stream::read::Decoder::new(&raw[..])?;
                let _ = std::io::Read::read_to_end(&mut dec, &mut out);
                out
            } else {
                raw
            };
            for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
                    continue; // a torn last line of a segment still being written
                };
                let msg = v["message"].as_str().expect("every event has a message");
                let mut it = msg.split_whitespace();
                let pod = it.next().and_then(|s| s.strip_prefix("pod="));
                let seq = it.next().and_then(|s| s.strip_prefix("seq="));
                let (Some(pod), Some(seq)) = (pod, seq) else {
                    panic!("unexpected message {msg:?} in {}", seg.display());
                };
                assert!(
                    v["tags"]["pod"].as_str() == Some(&format!("writer-{pod}")),
                    "path_tags missing on {v}"
                );
                *seen.entry((pod.parse()?, seq.parse()?)).or_insert(0) += 1;
            }
        }
    }
    Ok(seen)
}

#[test]
fn growing_from_two_to_three_shards_delivers_every_line_exactly_once() -> Result<()> {
    let bin = voltail_tests::voltail_bin();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let logs = root.join("logs/nginx");
    std::fs::create_dir_all(&logs)?;
    std::fs::create_dir_all(root.join("shards"))?;

    // The hand-over must actually move directories for this test to mean anything.
    let owner = |i: usize, count: u32| {
        (0..count)
            .find(|&o| {
                in_shard(
                    Shard { ordinal: o, count },
                    &pod_dir(&logs, i).join("access.log"),
                )
            })
            .expect("some shard owns every directory")
    };
    let moved = (0..PODS).filter(|&i| owner(i, 2) != owner(i, 3)).count();
    assert!(
        moved > 0,
        "no directory changes owner between 2 and 3 shards"
    );

    let stop_writing = Arc::new(AtomicBool::new(false));
    let w = writer(logs.clone(), Arc::clone(&stop_writing));

    // Phase 1: two replicas.
    let mut two = Vec::new();
    for o in 0..2 {
        let cfg = config(root, &format!("voltail-{o}/2"), o)?;
        two.push(start(&bin, &cfg, &format!("voltail-{o}-of-2"), root)?);
    }
    std::thread::sleep(Duration::from_secs(3));

    // Hand-over, as in docs/operations.md: stop all, reshard once, start the new count.
    for r in two {
        stop(r, root)?;
    }
    let out = Command::new(&bin)
        .args(["reshard", "--count", "3", "--dir"])
        .arg(root.join("shards"))
        .output()?;
    assert!(
        out.status.success(),
        "voltail reshard: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cfgs = Vec::new();
    for o in 0..3 {
        cfgs.push(config(root, &format!("voltail-{o}/3"), o)?);
    }
    let mut three = Vec::new();
    for (o, cfg) in cfgs.iter().enumerate() {
        three.push(start(&bin, cfg, &format!("voltail-{o}-of-3"), root)?);
    }
    std::thread::sleep(Duration::from_secs(2));
    stop_writing.store(true, Ordering::Relaxed);
    let written = w.join().expect("writer thread")?;
    let total: u64 = written.iter().sum();

    // Wait for the three to catch up, then stop them (the drain flushes the sinks).
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered(root)?.len() < total as usize && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    for r in three {
        stop(r, root)?;
    }

    let seen = delivered(root)?;
    let mut missing = Vec::new();
    for (pod, &n) in written.iter().enumerate() {
        for seq in 0..n {
            if !seen.contains_key(&(pod, seq)) {
                missing.push((pod, seq));
            }
        }
    }
    let dups: Vec<_> = seen.iter().filter(|(_, &c)| c > 1).collect();
    assert!(
        missing.is_empty() && dups.is_empty(),
        "{total} lines written in {PODS} directories ({moved} moved shard): {} missing (first {:?}), {} delivered more than once (e.g. {:?})",
        missing.len(),
        missing.first(),
        dups.len(),
        dups.first()
    );
    assert_eq!(seen.len() as u64, total, "extra events delivered");
    Ok(())
}
