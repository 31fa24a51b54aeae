//! The collector end to end: the real binary on real directories.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use voltail::generate::{self, GenerateOptions};
use voltail_tests::{assert_exactly_once, gen, log_files, voltail_bin, Collector, Setup};

#[test]
fn delivers_200k_lines_from_8_pods_exactly_once_with_tags() {
    let s = Setup::new();
    gen(&s.logs, 8, 25_000, 1);
    let cfg = s.config("", "");
    let c = Collector::start(&cfg, s.port);
    assert!(
        c.wait_lines(200_000, Duration::from_secs(120)),
        "read all lines; log:\n{}",
        c.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.stop(), 0, "SIGTERM exits 0");
    let events = s.sink();
    assert_eq!(assert_exactly_once(&events, &log_files(&s.logs)), 200_000);
    for e in events.iter().step_by(997) {
        let dir = Path::new(&e.file)
            .parent()
            .and_then(|p| p.file_name())
            .expect("pod dir")
            .to_string_lossy()
            .to_string();
        let parts: Vec<&str> = dir.split('_').collect();
        assert_eq!(e.tags["app"], "nginx");
        assert_eq!(e.tags["namespace"], parts[0]);
        assert_eq!(e.tags["pod"], parts[1]);
        assert_eq!(e.tags["pod_ip"], parts[2]);
        assert_eq!(e.tags["node_ip"], parts[3]);
        assert_eq!(e.tags["node"], parts[4]);
        assert_eq!(e.source, "nginx");
        assert!(
            e.timestamp.ends_with('Z') && e.timestamp.len() == 24,
            "{}",
            e.timestamp
        );
    }
}

#[test]
fn sigkill_at_several_points_then_restart_is_exactly_once() {
    let s = Setup::new();
    gen(&s.logs, 8, 20_000, 2);
    // Small segments so kills land around segment rolls too.
    let cfg = s.config("", "segment_max_bytes = 262144");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (logs, stop) = (s.logs.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let o = GenerateOptions {
                dir: logs,
                pod_dir: None,
                pods: 8,
                rate: 500,
                lines: 1500,
                app: "nginx".into(),
                file: "access.log".into(),
                rotate_bytes: 0,
                seed: 3,
            };
            generate::run(&o, &stop).expect("generate")
        })
    };
    let mut rng = fastrand::Rng::with_seed(42);
    for round in 0..6 {
        let c = Collector::start(&cfg, s.port);
        assert!(
            c.wait_up(Duration::from_secs(20)),
            "started; log:\n{}",
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(150 + rng.u64(0..600)));
        eprintln!("round {round}: SIGKILL");
        c.kill();
    }
    writer.join().expect("writer");
    let c = Collector::start(&cfg, s.port);
    let total: usize = log_files(&s.logs)
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("read").lines().count())
        .sum();
    let end = std::time::Instant::now() + Duration::from_secs(120);
    while s.sink().len() < total && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(c.stop(), 0);
    assert_eq!(assert_exactly_once(&s.sink(), &log_files(&s.logs)), total);
}

#[test]
fn rotation_and_copytruncate_under_a_concurrent_writer() {
    let s = Setup::new();
    let rot_dir = s.logs.join("nginx/default_rot-1_10.0.0.1_10.1.0.1_node-a");
    let ct_dir = s.logs.join("nginx/default_ct-1_10.0.0.2_10.1.0.1_node-a");
    std::fs::create_dir_all(&rot_dir).expect("mkdir");
    std::fs::create_dir_all(&ct_dir).expect("mkdir");
    let cfg = s.config("", "compression = \"none\"");
    let c = Collector::start(&cfg, s.port);
    assert!(c.wait_up(Duration::from_secs(20)));
    // Rename rotation every 500 lines: access.log -> access.log.N (not matched by the glob).
    // Before each rotation the writer lets the collector catch up, as real rotation (per
    // minute or hour) does; a file must sit at its globbed path for one poll to be seen at all.
    let mut written = 0u64;
    let caught_up = |n: u64| {
        assert!(
            c.wait_lines(n, Duration::from_secs(60)),
            "collector caught up to {n}"
        )
    };
    let mut rotated = Vec::new();
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(rot_dir.join("access.log"))
        .expect("open");
    for i in 0..3000 {
        writeln!(f, "rot line {i} {}", "x".repeat(100)).expect("write");
        written += 1;
        if i % 500 == 499 {
            caught_up(written);
            let to = rot_dir.join(format!("access.log.{}", i / 500));
            std::fs::rename(rot_dir.join("access.log"), &to).expect("rotate");
            rotated.push(to);
            // The writer has not reopened yet: this line goes to the rotated file.
            writeln!(f, "late line after rename {i}").expect("late write to the old file");
            written += 1;
            f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(rot_dir.join("access.log"))
                .expect("reopen");
        }
        if i % 100 == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // copytruncate: the writer keeps its O_APPEND descriptor; the file is copied, truncated.
    let ct = ct_dir.join("access.log");
    let mut w = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&ct)
        .expect("open");
    for i in 0..1000 {
        writeln!(w, "ct line {i}").expect("write");
        written += 1;
        if i % 250 == 249 {
            caught_up(written);
            std::fs::copy(&ct, ct_dir.join(format!("copy.{i}"))).expect("copy");
            OpenOptions::new()
                .write(true)
                .open(&ct)
                .expect("open")
                .set_len(0)
                .expect("truncate");
        }
    }
    caught_up(written);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.stop(), 0);
    let events = s.sink();
    let mut files: Vec<PathBuf> = rotated.clone();
    files.push(rot_dir.join("access.log"));
    let rot_events: Vec<_> = events
        .iter()
        .filter(|e| e.file.contains("rot-1"))
        .cloned()
        .collect();
    // Each rotated file is shipped under the path it was read at (access.log); check content.
    let mut msgs: Vec<String> = rot_events.iter().map(|e| e.message.clone()).collect();
    let mut want: Vec<String> = files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .expect("read")
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    msgs.sort();
    want.sort();
    assert_eq!(
        msgs.len(),
        want.len(),
        "rename rotation: every line exactly once"
    );
    assert_eq!(msgs, want);
    let ct_msgs: Vec<String> = events
        .iter()
        .filter(|e| e.file.contains("ct-1"))
        .map(|e| e.message.clone())
        .collect();
    let mut uniq = ct_msgs.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), ct_msgs.len(), "copytruncate: no duplicates");
    for i in 0..1000 {
        assert!(
            ct_msgs.contains(&format!("ct line {i}")),
            "copytruncate: line {i} delivered (writes were paced)"
        );
    }
}

#[test]
fn corrupted_checkpoint_is_reported_and_recovered_without_loss() {
    let s = Setup::new();
    gen(&s.logs, 4, 5_000, 4);
    let cfg = s.config("", "");
    // Run long enough for the periodic backup (every 30 checkpoint writes) to exist.
    let c = Collector::start(&cfg, s.port);
    assert!(c.wait_lines(20_000, Duration::from_secs(60)));
    let writer = std::thread::spawn({
        let logs = s.logs.clone();
        move || {
            let o = GenerateOptions {
                dir: logs,
                pod_dir: None,
                pods: 4,
                rate: 200,
                lines: 2000,
                app: "nginx".into(),
                file: "access.log".into(),
                rotate_bytes: 0,
                seed: 5,
            };
            generate::run(&o, &AtomicBool::new(false)).expect("gen")
        }
    });
    writer.join().expect("writer");
    assert!(s.data.join("checkpoint.bak").exists(), "backup written");
    c.kill();

    // Random bytes over the whole checkpoint: the backup is used, and with the sink cursor
    // in it, the output stays exactly once.
    let ck = s.data.join("checkpoint.bin");
    let len = std::fs::metadata(&ck).expect("md").len() as usize;
    let mut junk = vec![0u8; len];
    fastrand::Rng::with_seed(9).fill(&mut junk);
    std::fs::write(&ck, &junk).expect("corrupt");
    let c = Collector::start(&cfg, s.port);
    assert!(c.wait_up(Duration::from_secs(20)));
    let total = 4 * 7000;
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while s.sink().len() < total && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = c.log_text();
    assert_eq!(c.stop(), 0);
    assert!(
        log.contains("checkpoint was damaged; recovered") && log.contains("from=\"backup\""),
        "{log}"
    );
    assert!(std::fs::read_dir(&s.data).expect("ls").flatten().any(|e| e
        .file_name()
        .to_string_lossy()
        .starts_with("checkpoint.bin.corrupt-")));
    assert_exactly_once(&s.sink(), &log_files(&s.logs));

    // Truncated to its header, wrong version, no backup: loud, no crash, every line still shipped.
    std::fs::remove_file(s.data.join("checkpoint.bak")).expect("rm bak");
    let mut f = std::fs::read(&ck).expect("read");
    f.truncate(4096 + 40);
    f[4096 + 4] = 99;
    std::fs::write(&ck, &f).expect("truncate");
    let c = Collector::start(&cfg, s.port);
    assert!(c.wait_lines(total as u64, Duration::from_secs(60)));
    let log = c.log_text();
    assert_eq!(c.stop(), 0);
    assert!(log.contains("checkpoint unreadable and no backup"), "{log}");
    let events = s.sink();
    for f in log_files(&s.logs) {
        let n = std::fs::read_to_string(&f).expect("read").lines().count();
        let got = events.iter().filter(|e| Path::new(&e.file) == f).count();
        assert!(got >= n, "{}: {got} of {n} lines", f.display());
    }
}

/// A config for a second instance on the same data_dir and sink (a rolling update), with its
/// own metrics port.
fn second_instance_config(s: &Setup, cfg: &Path) -> (PathBuf, u16) {
    let port_b = voltail_tests::free_port();
    let text = std::fs::read_to_string(cfg)
        .expect("cfg")
        .replace(&format!(":{}\"", s.port), &format!(":{port_b}\""));
    let cfg_b = s.tmp.path().join("b.toml");
    std::fs::write(&cfg_b, text).expect("cfg b");
    (cfg_b, port_b)
}

#[test]
fn second_instance_waits_then_takes_over_without_duplicates() {
    let s = Setup::new();
    gen(&s.logs, 2, 2_000, 6);
    let cfg = s.config("", "");
    let a = Collector::start(&cfg, s.port);
    assert!(a.wait_lines(4_000, Duration::from_secs(30)));
    // B shares data_dir and sink (a rolling update); its own metrics port.
    let (cfg_b, port_b) = second_instance_config(&s, &cfg);
    let b = Collector::start(&cfg_b, port_b);
    let mut health = String::new();
    for _ in 0..100 {
        health = b.get("/health").unwrap_or_default();
        if health.contains("waiting_for_lock") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        health.contains("waiting_for_lock") && health.contains(&format!("pid {}", a.child.id())),
        "{health}"
    );
    assert!(b
        .get("/ready")
        .is_some_and(|r| r.contains("waiting_for_lock")));
    assert_eq!(
        b.metric("voltail_read_lines_total").unwrap_or(0.0),
        0.0,
        "B reads nothing while waiting"
    );
    assert_eq!(a.stop(), 0);
    gen(&s.logs, 2, 3_000, 7); // 3,000 more lines per pod
    assert!(
        b.wait_lines(6_000, Duration::from_secs(30)),
        "B took over; log:\n{}",
        b.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(b.stop(), 0);
    assert_eq!(assert_exactly_once(&s.sink(), &log_files(&s.logs)), 10_000);
}

#[test]
fn symlink_to_a_file_outside_the_roots_is_never_shipped() {
    let s = Setup::new();
    let secret = s.tmp.path().join("secret.txt");
    std::fs::write(&secret, "root:x:0:0:secret\n").expect("secret");
    let pod = s.logs.join("nginx/default_evil-1_10.0.0.9_10.1.0.1_node-a");
    std::fs::create_dir_all(&pod).expect("mkdir");
    std::os::unix::fs::symlink(&secret, pod.join("access.log")).expect("symlink");
    let outside_dir = s.tmp.path().join("elsewhere/default_evil-2_1_2_n");
    std::fs::create_dir_all(&outside_dir).expect("mkdir");
    std::fs::write(outside_dir.join("access.log"), "secret via dir link\n").expect("w");
    std::os::unix::fs::symlink(&outside_dir, s.logs.join("nginx/default_evil-2_1_2_n"))
        .expect("dir link");
    gen(&s.logs, 1, 100, 7);
    let c = Collector::start(&s.config("", ""), s.port);
    assert!(c.wait_lines(100, Duration::from_secs(30)));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(c.metric("voltail_symlinks_refused_total"), Some(2.0));
    let log = c.log_text();
    assert_eq!(c.stop(), 0);
    assert!(log.contains("refusing symlink to outside the include roots"));
    let events = s.sink();
    assert_eq!(events.len(), 100);
    assert!(events.iter().all(|e| !e.message.contains("secret")));
}

#[test]
fn a_100_mb_line_without_newline_keeps_memory_bounded() {
    let s = Setup::new();
    let pod = s.logs.join("nginx/default_big-1_10.0.0.3_10.1.0.1_node-a");
    std::fs::create_dir_all(&pod).expect("mkdir");
    {
        let mut f = std::fs::File::create(pod.join("access.log")).expect("create");
        let chunk = "0123456789abcdef".repeat(65536); // 1 MiB
        for _ in 0..100 {
            f.write_all(chunk.as_bytes()).expect("write");
        }
    }
    let c = Collector::start(&s.config("max_line_bytes = 524288", ""), s.port);
    assert!(c.wait_up(Duration::from_secs(20)));
    let end = std::time::Instant::now() + Duration::from_secs(120);
    while c.metric("voltail_lines_split_total").unwrap_or(0.0) < 200.0
        && std::time::Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let peak = c.peak_rss_kib().expect("VmHWM");
    let split = c.metric("voltail_lines_split_total").unwrap_or(0.0);
    assert_eq!(c.stop(), 0);
    // 199 cuts at max_line_bytes; the last piece has no newline and is flushed after
    // flush_partial_after.
    assert_eq!(split, 199.0, "100 MiB in 512 KiB pieces, none dropped");
    assert!(
        peak < 160 * 1024,
        "peak RSS {peak} KiB: memory is bounded, not the size of the line"
    );
    let events = s.sink();
    assert_eq!(events.len(), 200);
    assert_eq!(
        events.iter().map(|e| e.message.len() as u64).sum::<u64>(),
        100 << 20
    );
    assert!(events.iter().all(|e| e.message.len() == 524288));
}

#[test]
fn check_names_the_key_and_line_of_broken_configs() {
    let s = Setup::new();
    let good = s.config("", "");
    let out = Command::new(voltail_bin())
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .expect("check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("discover_interval = \"300ms\""));
    let text = std::fs::read_to_string(&good).expect("read");
    let cases = [
        (
            text.replace("poll_interval = \"100ms\"", "poll_interval = \"soon\""),
            "line 14",
            "invalid duration",
        ),
        (
            text.replace("(?P<app>", "(?P<app"),
            ":13: sources[0].path_tags",
            "bad regex",
        ),
        (
            text.replace("type = \"file\"", "type = \"carrier-pigeon\""),
            "line 21",
            "unknown variant `carrier-pigeon`",
        ),
        (
            text.replace("[batch]", "[batch]\nmax_bytes = 3"),
            ":8: batch.max_bytes",
            "1024",
        ),
        (
            text.replace(
                "name = \"nginx\"",
                "name = \"nginx\"\npoll_intervall = \"1s\"",
            ),
            "line 11",
            "unknown field `poll_intervall`",
        ),
        (
            format!("{text}\n[[sources]]\nname = \"x\"\ninclude = [\"relative/*.log\"]\n"),
            "sources[1].include",
            "not an absolute path",
        ),
    ];
    for (i, (bad, where_, what)) in cases.iter().enumerate() {
        let p = s.tmp.path().join(format!("bad{i}.toml"));
        std::fs::write(&p, bad).expect("write");
        let out = Command::new(voltail_bin())
            .args(["check", "--config"])
            .arg(&p)
            .output()
            .expect("check");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "case {i}: {err}");
        assert!(
            err.contains(where_) && err.contains(what),
            "case {i}: expected {where_:?} and {what:?} in: {err}"
        );
    }
    let out = Command::new(voltail_bin())
        .args(["check", "--config", "/nonexistent.toml"])
        .output()
        .expect("check");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config /nonexistent.toml"));
    let v = Command::new(voltail_bin())
        .arg("--version")
        .output()
        .expect("version");
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("voltail "));
}

#[test]
fn invalid_utf8_and_crlf_are_shipped_safely() {
    let s = Setup::new();
    let pod = s.logs.join("nginx/default_bin-1_10.0.0.4_10.1.0.1_node-a");
    std::fs::create_dir_all(&pod).expect("mkdir");
    std::fs::write(
        pod.join("access.log"),
        b"ok line\r\nbad \xff\xfe bytes\n\x00nul\x1b[31m\n",
    )
    .expect("w");
    let c = Collector::start(&s.config("", ""), s.port);
    assert!(c.wait_lines(3, Duration::from_secs(20)));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.metric("voltail_invalid_utf8_lines_total"), Some(1.0));
    assert_eq!(c.stop(), 0);
    let m: Vec<String> = s.sink().into_iter().map(|e| e.message).collect();
    assert_eq!(
        m,
        vec![
            "ok line".to_string(),
            "bad \u{fffd}\u{fffd} bytes".into(),
            "\u{0}nul\u{1b}[31m".into()
        ]
    );
}

#[test]
fn stop_while_waiting_for_lock_exits_zero() {
    let s = Setup::new();
    let cfg = s.config("", "");
    let a = Collector::start(&cfg, s.port);
    assert!(a.wait_up(Duration::from_secs(20)));
    let (cfg_b, port_b) = second_instance_config(&s, &cfg);
    let b = Collector::start(&cfg_b, port_b);
    assert!(b.wait_up(Duration::from_secs(20)));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(b.stop(), 0);
    assert_eq!(a.stop(), 0);
}
