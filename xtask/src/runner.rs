//! Running collectors: the voltail config we give them, the processes, and what they cost.
//!
//! [`Proc`] spawns a collector in its own process group with its output in a log file, samples
//! its CPU time and memory from `/proc` (summed over its process tree, so a peer started through
//! `sh -c` is measured whole), and on [`Proc::stop`] sends SIGTERM, waits for the drain, and
//! takes the final CPU time from `wait4`'s rusage. The peak RSS is the collector's own (see
//! [`Exit::max_rss_kib`]): `wait4`'s `ru_maxrss` alone can be the bench's. [`VoltailConfig`]
//! renders the TOML the daemon reads; [`scrape`] reads its Prometheus metrics.
//!
//! It does not decide what to measure or when: the workloads in `bench` do.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of one process (all its threads), from `/proc/<pid>/stat`.
fn proc_cpu(pid: i32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / clk_tck()))
}

/// `VmRSS` and `VmHWM` of one process, KiB.
fn proc_mem(pid: i32) -> Option<(u64, u64)> {
    proc_mem_of(&pid.to_string())
}

/// `VmRSS` and `VmHWM` of `/proc/<which>` (a pid, or `self`), KiB.
fn proc_mem_of(which: &str) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{which}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// `pid` and all its descendants.
fn tree(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                    out.extend(c.split_whitespace().filter_map(|x| x.parse::<i32>().ok()));
                }
            }
        }
        i += 1;
    }
    out
}

/// Process groups of the collectors running now (for the interrupt handler).
static LIVE: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Kills every collector still running (the bench was interrupted).
pub fn kill_all() {
    for pg in LIVE.lock().map(|v| v.clone()).unwrap_or_default() {
        // SAFETY: kill has no memory preconditions; the groups are ours.
        unsafe { libc::kill(-pg, libc::SIGKILL) };
    }
}

/// How a collector process ended.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    /// Its status.
    pub status: ExitStatus,
    /// Spawn to exit.
    pub wall: Duration,
    /// User + system CPU of the process and the children it waited for.
    pub cpu: Duration,
    /// Peak resident set of the collector itself, KiB: `ru_maxrss` when that is the
    /// collector's own, else the largest `VmHWM` sampled while it ran (see `Proc::own_peak_kib`).
    pub max_rss_kib: u64,
}

/// A running collector.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    pid: i32,
    /// When it was spawned.
    pub started: Instant,
    log: PathBuf,
    exit: Option<Exit>,
    /// Largest tree CPU time seen by [`Proc::cpu`] (a peer's children may outlive `sh`).
    last_cpu: Duration,
    /// This process's `VmHWM` when it spawned the collector, KiB: what `ru_maxrss` starts from.
    spawner_hwm_kib: u64,
    /// Largest `VmHWM` of the collector's tree seen while it ran, KiB.
    sampled_hwm_kib: u64,
}

impl Proc {
    /// Spawns `cmd` in its own process group, stdout and stderr into `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let spawner_hwm_kib = proc_mem_of("self").map_or(u64::MAX, |(_, hwm)| hwm);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {name}: {cmd:?}"))?;
        let pid = i32::try_from(child.id()).context("pid fits i32")?;
        if let Ok(mut v) = LIVE.lock() {
            v.push(pid);
        }
        Ok(Proc {
            name: name.to_string(),
            child,
            pid,
            started: Instant::now(),
            log: log.to_path_buf(),
            exit: None,
            last_cpu: Duration::ZERO,
            spawner_hwm_kib,
            sampled_hwm_kib: 0,
        })
    }

    /// CPU time of the whole process tree so far.
    pub fn cpu(&mut self) -> Duration {
        let t: Duration = tree(self.pid).into_iter().filter_map(proc_cpu).sum();
        self.last_cpu = self.last_cpu.max(t);
        t
    }

    /// Resident set of the tree, and the main process's peak, KiB.
    pub fn mem(&self) -> (u64, u64) {
        let mut rss = 0;
        let mut hwm = 0;
        for (i, p) in tree(self.pid).into_iter().enumerate() {
            if let Some((r, h)) = proc_mem(p) {
                rss += r;
                if i == 0 {
                    hwm = h;
                }
            }
        }
        (rss, hwm)
    }

    /// Peak resident set of the collector itself, KiB, from `wait4`'s `ru_maxrss` (`maxrss`)
    /// and the `VmHWM` samples.
    ///
    /// `ru_maxrss` is not only the child's: on `execve` Linux folds the high-water mark of the
    /// memory the process had before (`exec_mmap`: `setmax_mm_hiwater_rss`) into it, and
    /// `Command::spawn` uses `posix_spawn`, whose child runs in the bench's own memory
    /// (`CLONE_VM | CLONE_VFORK`) until it execs. So `ru_maxrss` is at least this process's
    /// `VmHWM` at spawn: after the bench has read a 128 MiB segment it said 150 MiB for a
    /// collector whose own peak was 57 MiB. When `ru_maxrss` is above what the bench had,
    /// it is the collector's own peak, exactly; otherwise the largest `VmHWM` sampled while
    /// the collector ran is (sampled every 10-20 ms until it exits, and `VmHWM` only grows).
    fn own_peak_kib(&self, maxrss: u64) -> u64 {
        if maxrss > self.spawner_hwm_kib || self.sampled_hwm_kib == 0 {
            maxrss
        } else {
            self.sampled_hwm_kib
        }
    }

    /// Notes the tree's `VmHWM` while the collector is still running.
    fn sample_hwm(&mut self) {
        let hwm = tree(self.pid)
            .into_iter()
            .filter_map(proc_mem)
            .map(|(_, hwm)| hwm)
            .max()
            .unwrap_or(0);
        self.sampled_hwm_kib = self.sampled_hwm_kib.max(hwm);
    }

    fn wait4(&mut self, flags: i32) -> Option<Exit> {
        if let Some(e) = self.exit {
            return Some(e);
        }
        self.sample_hwm();
        let mut status = 0;
        // SAFETY: a zeroed rusage is a valid value for the kernel to fill.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: pid is our child; the out-pointers are valid for the call.
        let r = unsafe { libc::wait4(self.pid, &mut status, flags, &mut ru) };
        if r != self.pid {
            return None;
        }
        if let Ok(mut v) = LIVE.lock() {
            v.retain(|p| *p != self.pid);
        }
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        let cpu = (tv(ru.ru_utime) + tv(ru.ru_stime)).max(self.last_cpu);
        let e = Exit {
            status: ExitStatus::from_raw(status),
            wall: self.started.elapsed(),
            cpu,
            max_rss_kib: self.own_peak_kib(ru.ru_maxrss as u64),
        };
        self.exit = Some(e);
        Some(e)
    }

    /// The exit, if it has exited (reaps it).
    pub fn exited(&mut self) -> Option<Exit> {
        self.wait4(libc::WNOHANG)
    }

    /// SIGTERM (to the process, or its whole group for peers), then waits up to `grace`
    /// before SIGKILL. Returns how it ended.
    pub fn stop(&mut self, group: bool, grace: Duration) -> Result<Exit> {
        if let Some(e) = self.exited() {
            return Ok(e);
        }
        if group {
            self.cpu();
        }
        let target = if group { -self.pid } else { self.pid };
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(target, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(e) = self.exited() {
                if group {
                    // SAFETY: as above; the group may hold the peer's children.
                    unsafe { libc::kill(-self.pid, libc::SIGKILL) };
                }
                return Ok(e);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        let _ = self.child.kill();
        let e = self.wait4(0);
        bail!(
            "{} did not exit within {grace:?} of SIGTERM (killed: {e:?}); log {}:\n{}",
            self.name,
            self.log.display(),
            self.log_tail()
        )
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exit.is_none() {
            // SAFETY: kill has no memory preconditions; the group is ours.
            unsafe { libc::kill(-self.pid, libc::SIGKILL) };
            let _ = self.wait4(0);
        }
    }
}

/// A free TCP port on 127.0.0.1 (free now; the daemon binds it a moment later).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// What a voltail run is configured with.
#[derive(Debug, Clone)]
pub struct VoltailConfig {
    /// Checkpoint and lock.
    pub data_dir: PathBuf,
    /// `auto`, `io_uring` or `pread`.
    pub reader: String,
    /// The include glob.
    pub include: String,
    /// The path-tag regex.
    pub path_tags: String,
    /// `poll_interval`.
    pub poll_interval: Duration,
    /// `max_poll_interval` (None: the daemon's default).
    pub max_poll_interval: Option<Duration>,
    /// `zstd` or `none`.
    pub compression: String,
    /// Sink directory.
    pub out: PathBuf,
    /// Metrics port on 127.0.0.1.
    pub metrics_port: u16,
    /// Ship to this URL with the `http` sink instead of writing segments to `out`.
    pub http_url: Option<String>,
    /// `probe = "on"` with this `probe_poll_interval`; `None`: `probe = "off"`.
    pub probe_poll_interval: Option<Duration>,
    /// `[batch] linger` (None: the daemon's default).
    pub linger: Option<Duration>,
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

impl VoltailConfig {
    /// The TOML file.
    pub fn render(&self) -> String {
        let mut s = format!(
            "data_dir = {}\nreader = {}\n{}\n[metrics]\naddress = \"127.0.0.1:{}\"\n\n\
             [[sources]]\nname = \"nginx\"\ninclude = [{}]\npath_tags = {}\nstart_at = \"beginning\"\n\
             poll_interval = \"{}ms\"\n",
            toml_str(&self.data_dir.display().to_string()),
            toml_str(&self.reader),
            match self.probe_poll_interval {
                Some(p) => format!(
                    "probe = \"on\"\nprobe_poll_interval = \"{}ms\"\n",
                    p.as_millis()
                ),
                None => "probe = \"off\"\n".to_string(),
            },
            self.metrics_port,
            toml_str(&self.include),
            toml_str(&self.path_tags),
            self.poll_interval.as_millis(),
        );
        if let Some(m) = self.max_poll_interval {
            s.push_str(&format!("max_poll_interval = \"{}ms\"\n", m.as_millis()));
        }
        if let Some(l) = self.linger {
            s.push_str(&format!("\n[batch]\nlinger = \"{}ms\"\n", l.as_millis()));
        }
        match &self.http_url {
            Some(url) => s.push_str(&format!(
                "\n[sink]\ntype = \"http\"\nurl = {}\ncompression = {}\ncompression_level = 1\n",
                toml_str(url),
                toml_str(&self.compression),
            )),
            None => s.push_str(&format!(
                "\n[sink]\ntype = \"file\"\npath = {}\ncompression = {}\ncompression_level = 1\n",
                toml_str(&self.out.display().to_string()),
                toml_str(&self.compression),
            )),
        }
        s
    }
}

/// Scrapes `GET /metrics` and sums each metric over its label sets; labelled series are also
/// kept whole (`name{labels}`).
pub fn scrape(port: u16) -> Result<HashMap<String, f64>> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let Some((head, body)) = body.split_once("\r\n\r\n") else {
        bail!("no http response from metrics");
    };
    if !head.starts_with("HTTP/1.") || !head.contains(" 200") {
        bail!("metrics answered {}", head.lines().next().unwrap_or(""));
    }
    Ok(parse_metrics(body))
}

fn parse_metrics(body: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in body.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let name = key.split('{').next().unwrap_or(key).to_string();
        if key.contains('{') {
            out.insert(key.to_string(), v);
        }
        *out.entry(name).or_insert(0.0) += v;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: W1's http row said 150 MiB for a collector whose own peak was 57 MiB, because
    /// `ru_maxrss` starts from the spawning process's high-water mark.
    #[test]
    fn peak_rss_is_the_collectors_not_the_benchs() -> Result<()> {
        // Raise this process's high-water mark far above what `sleep` uses, then let it go.
        let mut big = vec![0u8; 128 << 20];
        for b in big.iter_mut().step_by(4096) {
            *b = 1;
        }
        drop(std::hint::black_box(big));
        let (_, hwm) = proc_mem_of("self").context("own VmHWM")?;
        assert!(hwm > 128 << 10, "the test raised its own peak: {hwm} KiB");
        let log = std::env::temp_dir().join(format!("xtask-peak-rss-{}.log", std::process::id()));
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut p = Proc::spawn("sleep", cmd, &log)?;
        let e = p.stop(false, Duration::from_secs(10))?;
        let _ = std::fs::remove_file(&log);
        assert!(
            e.max_rss_kib < 32 << 10,
            "sleep's peak is its own few MiB, not the bench's {hwm} KiB: {} KiB",
            e.max_rss_kib
        );
        Ok(())
    }

    #[test]
    fn metrics_sum_over_labels() {
        let m = parse_metrics(
            "# TYPE x counter\nvoltail_sink_bytes_total{kind=\"raw\"} 10\n\
             voltail_sink_bytes_total{kind=\"compressed\"} 4\nvoltail_read_lines_total 7\n",
        );
        assert_eq!(m["voltail_read_lines_total"], 7.0);
        assert_eq!(m["voltail_sink_bytes_total"], 14.0);
        assert_eq!(m["voltail_sink_bytes_total{kind=\"raw\"}"], 10.0);
    }

    #[test]
    fn config_renders_as_toml() {
        let c = VoltailConfig {
            data_dir: "/tmp/d".into(),
            reader: "pread".into(),
            include: "/r/*/*/*.log".into(),
            path_tags: "^/r/(?P<app>[^/]+)/".into(),
            poll_interval: Duration::from_secs(1),
            max_poll_interval: Some(Duration::from_secs(1)),
            compression: "none".into(),
            out: "/tmp/o".into(),
            metrics_port: 9000,
            http_url: None,
            probe_poll_interval: None,
            linger: None,
        };
        let t = c.render();
        assert!(t.contains("poll_interval = \"1000ms\""), "{t}");
        assert!(t.contains("probe = \"off\"\n"), "{t}");
        let on = VoltailConfig {
            probe_poll_interval: Some(Duration::from_secs(10)),
            ..c
        }
        .render();
        assert!(
            on.contains("probe = \"on\"\nprobe_poll_interval = \"10000ms\"\n"),
            "{on}"
        );
        assert!(t.contains("path_tags = \"^/r/(?P<app>[^/]+)/\""), "{t}");
    }

    #[test]
    fn proc_measures_and_stops_a_child() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("sleep 30");
        let mut p = Proc::spawn("sleep", cmd, &dir.path().join("log")).expect("spawn");
        std::thread::sleep(Duration::from_millis(100));
        assert!(p.exited().is_none());
        assert!(p.mem().0 > 0);
        let e = p.stop(true, Duration::from_secs(5)).expect("stops");
        assert_eq!(e.status.signal(), Some(libc::SIGTERM));
    }
}
