//! The eBPF write probe end to end: with every poll interval at 30 s, a line written by a
//! local process reaches the sink at once with the probe on, and does not with it off; with
//! `probe_writer_tags` the line carries its writer's cgroup.

use std::fs::OpenOptions;
use std::io::Write;
use std::time::{Duration, Instant};

use voltail_tests::{must_run, Collector, Setup};

fn probe_possible() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root");
    }
    if !voltail_ebpf::COMPILED_IN {
        return Some("the probe was compiled out (no clang at build time)");
    }
    None
}

fn setup(probe: &str, top_extra: &str) -> (Setup, std::path::PathBuf, Collector) {
    let s = Setup::new();
    let pod = s
        .logs
        .join("nginx/default_probe-1_10.0.0.5_10.1.0.1_node-a");
    std::fs::create_dir_all(&pod).expect("mkdir");
    let log = pod.join("access.log");
    std::fs::write(&log, "first line\n").expect("write");
    let cfg = s.config("", "compression = \"none\"");
    let text = std::fs::read_to_string(&cfg)
        .expect("cfg")
        .replace(
            "probe = \"off\"",
            &format!("probe = \"{probe}\"\nprobe_poll_interval = \"30s\"\n{top_extra}"),
        )
        .replace("poll_interval = \"100ms\"", "poll_interval = \"30s\"")
        .replace(
            "max_poll_interval = \"500ms\"",
            "max_poll_interval = \"30s\"",
        )
        .replace(
            "discover_interval = \"300ms\"",
            "discover_interval = \"30s\"",
        )
        .replace("linger = \"50ms\"", "linger = \"10ms\"");
    std::fs::write(&cfg, text).expect("cfg");
    let c = Collector::start(&cfg, s.port);
    assert!(
        c.wait_lines(1, Duration::from_secs(20)),
        "first line read; log:\n{}",
        c.log_text()
    );
    (s, log, c)
}

fn wait_in_sink(s: &Setup, msg: &str, within: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < within {
        if s.sink().iter().any(|e| e.message == msg) {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

#[test]
fn local_write_reaches_the_sink_at_once_with_the_probe() {
    if let Some(why) = probe_possible() {
        assert!(!must_run(), "CI must run the probe test, but: {why}");
        eprintln!("skipping probe test: {why}");
        return;
    }
    let (s, log, c) = setup("on", "");
    assert_eq!(
        c.metric("voltail_probe_active"),
        Some(1.0),
        "log:\n{}",
        c.log_text()
    );
    let mut latencies = Vec::new();
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(300));
        let msg = format!("written locally {i}");
        let mut f = OpenOptions::new().append(true).open(&log).expect("open");
        writeln!(f, "{msg}").expect("write");
        drop(f);
        let got = wait_in_sink(&s, &msg, Duration::from_secs(5));
        assert!(
            got.is_some(),
            "line {i} never arrived with the probe on; log:\n{}",
            c.log_text()
        );
        latencies.extend(got);
    }
    latencies.sort();
    eprintln!("probe write-to-sink latencies: {latencies:?}");
    assert!(
        latencies[2] <= Duration::from_millis(200),
        "median {:?} above 200 ms: {latencies:?}",
        latencies[2]
    );
    assert!(c.metric("voltail_probe_wakeups_total").unwrap_or(0.0) >= 5.0);
    assert!(c.metric("voltail_probe_events_total").unwrap_or(0.0) >= 5.0);
    assert_eq!(c.stop(), 0);
}

#[test]
fn without_the_probe_the_same_write_waits_for_the_poll() {
    let (s, log, c) = setup("off", "");
    std::thread::sleep(Duration::from_millis(300));
    let mut f = OpenOptions::new().append(true).open(&log).expect("open");
    writeln!(f, "written locally").expect("write");
    drop(f);
    assert_eq!(
        wait_in_sink(&s, "written locally", Duration::from_secs(3)),
        None,
        "no probe, 30 s poll: not yet"
    );
    assert_eq!(c.metric("voltail_probe_active").unwrap_or(0.0), 0.0);
    assert_eq!(c.stop(), 0);
}

/// The cgroup2 mount, from /proc/self/mountinfo (`/sys/fs/cgroup/unified` on a hybrid host).
fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split(' ').next()? == "cgroup2").then(|| left.split(' ').nth(4).map(Into::into))?
    })
}

/// A cgroup made for one test, removed (with the cgroups under it) on drop.
struct TestCgroup(Vec<std::path::PathBuf>);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            // Empty once the writer has exited; rmdir is how cgroups are removed.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[test]
fn a_local_writer_in_its_own_cgroup_tags_the_file_with_it() {
    if let Some(why) = probe_possible() {
        assert!(!must_run(), "CI must run the probe test, but: {why}");
        eprintln!("skipping probe test: {why}");
        return;
    }
    let Some(root) = cgroup2_mount() else {
        assert!(
            !must_run(),
            "CI must run the writer tag test, but no cgroup2 is mounted"
        );
        eprintln!("skipping writer tag test: no cgroup2 mounted");
        return;
    };
    // A container's scope, so the container id is found too.
    let id = format!("{:064x}", u128::from(std::process::id()) << 64 | 0xc0ffee);
    let parent = root.join(format!("voltail-test-{}", std::process::id()));
    let scope = parent.join(format!("docker-{id}.scope"));
    std::fs::create_dir_all(&scope).expect("mkdir cgroup");
    let _cleanup = TestCgroup(vec![parent.clone(), scope.clone()]);
    let cgroup = format!(
        "/{}",
        scope.strip_prefix(&root).expect("under root").display()
    );

    let (s, log, c) = setup("on", "probe_writer_tags = true");
    // The first line was written before the collector started: no writer was seen, no tags.
    assert!(wait_in_sink(&s, "first line", Duration::from_secs(10)).is_some());
    let first = s
        .sink()
        .into_iter()
        .find(|e| e.message == "first line")
        .expect("first line");
    assert!(
        !first.tags.contains_key("writer_cgroup"),
        "{:?}",
        first.tags
    );

    std::thread::sleep(Duration::from_millis(300));
    // The shell moves itself into the cgroup, then writes with a builtin: the writer is in it.
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > '{}/cgroup.procs' && printf 'from the cgroup\\n' >> '{}'",
            scope.display(),
            log.display()
        ))
        .status()
        .expect("sh");
    assert!(st.success());
    assert!(
        wait_in_sink(&s, "from the cgroup", Duration::from_secs(5)).is_some(),
        "the line never arrived; log:\n{}",
        c.log_text()
    );
    let event = s
        .sink()
        .into_iter()
        .find(|e| e.message == "from the cgroup")
        .expect("event");
    assert_eq!(
        event.tags.get("writer_cgroup"),
        Some(&cgroup),
        "{:?}",
        event.tags
    );
    assert_eq!(
        event.tags.get("container_id"),
        Some(&id),
        "{:?}",
        event.tags
    );
    assert_eq!(
        event.tags.get("app").map(String::as_str),
        Some("nginx"),
        "path tags stay"
    );
    assert_eq!(c.stop(), 0);
}
