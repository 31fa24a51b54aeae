//! A load generator: nginx-like access lines written into pod-style directories, as the pods
//! of the original design write them onto the shared volume. Used by the demo, the Kubernetes
//! demo writer and the tests; it is not part of the data path.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// What to generate (also the arguments of `voltail generate`).
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateOptions {
    /// Root of the shared volume; pods go to `<dir>/<app>/<ns>_<pod>_<podIP>_<nodeIP>_<node>/`.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Write into this one directory instead (a pod writing its own `subPathExpr` directory).
    #[arg(long)]
    pub pod_dir: Option<PathBuf>,
    /// Number of pods.
    #[arg(long, default_value_t = 8)]
    pub pods: usize,
    /// Lines per second per pod (0: as fast as possible).
    #[arg(long, default_value_t = 10)]
    pub rate: u64,
    /// Stop after this many lines per pod (0: run until stopped).
    #[arg(long, default_value_t = 0)]
    pub lines: u64,
    /// App name (the first directory level).
    #[arg(long, default_value = "nginx")]
    pub app: String,
    /// File name in each pod directory.
    #[arg(long, default_value = "access.log")]
    pub file: String,
    /// Rotate (rename to `<file>.1`) when a file exceeds this many bytes (0: never).
    #[arg(long, default_value_t = 0)]
    pub rotate_bytes: u64,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

const PATHS: &[&str] = &[
    "/",
    "/index.html",
    "/api/v1/orders",
    "/api/v1/orders/8812",
    "/api/v1/users/me",
    "/static/app.js",
    "/static/app.css",
    "/healthz",
    "/login",
    "/search?q=shoes&page=2",
    "/cart",
    "/checkout",
];
const AGENTS: &[&str] = &[
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "curl/8.5.0",
    "kube-probe/1.30",
    "Go-http-client/1.1",
];
const METHODS: &[&str] = &["GET", "GET", "GET", "POST", "PUT", "DELETE"];
const STATUSES: &[u16] = &[200, 200, 200, 200, 201, 204, 301, 304, 400, 404, 500, 502];

/// One nginx "combined" access line (without the newline), `seq` embedded for checking.
pub fn nginx_line(rng: &mut fastrand::Rng, seq: u64) -> String {
    let t = humantime::format_rfc3339_millis(SystemTime::now());
    format!(
        "{}.{}.{}.{} - - [{t}] \"{} {} HTTP/1.1\" {} {} \"https://shop.example.com{}\" \"{}\" seq={seq}",
        rng.u8(1..=223),
        rng.u8(..),
        rng.u8(..),
        rng.u8(1..),
        METHODS[rng.usize(..METHODS.len())],
        PATHS[rng.usize(..PATHS.len())],
        STATUSES[rng.usize(..STATUSES.len())],
        rng.u32(0..60_000),
        PATHS[rng.usize(..PATHS.len())],
        AGENTS[rng.usize(..AGENTS.len())],
    )
}

/// The directory of pod `i`, named the way `subPathExpr` names it.
pub fn pod_dir(root: &Path, app: &str, i: usize) -> PathBuf {
    root.join(app).join(format!(
        "default_{app}-7d9f{i:03x}-x{i}_10.1.{}.{}_192.168.0.{}_node-{}",
        i / 250,
        i % 250 + 1,
        i % 4 + 1,
        (b'a' + (i % 4) as u8) as char
    ))
}

struct Pod {
    path: PathBuf,
    file: File,
    written: u64,
    bytes: u64,
    rng: fastrand::Rng,
}

fn open_append(p: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(p)
}

/// Writes until `lines` per pod are written or `stop` is set. Returns lines written in all.
pub fn run(o: &GenerateOptions, stop: &AtomicBool) -> std::io::Result<u64> {
    let dirs: Vec<PathBuf> = match &o.pod_dir {
        Some(d) => vec![d.clone()],
        None => (0..o.pods.max(1))
            .map(|i| pod_dir(&o.dir, &o.app, i))
            .collect(),
    };
    let mut pods = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        std::fs::create_dir_all(d)?;
        let path = d.join(&o.file);
        pods.push(Pod {
            file: open_append(&path)?,
            path,
            written: 0,
            bytes: 0,
            rng: fastrand::Rng::with_seed(o.seed + i as u64),
        });
    }
    let start = Instant::now();
    let mut total = 0u64;
    let mut buf = String::new();
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let mut active = false;
        for p in &mut pods {
            if o.lines > 0 && p.written >= o.lines {
                continue;
            }
            active = true;
            let target = if o.rate == 0 {
                p.written + 1000
            } else {
                (elapsed * o.rate as f64) as u64 + 1
            };
            let target = if o.lines > 0 {
                target.min(o.lines)
            } else {
                target
            };
            buf.clear();
            let before = p.written;
            while p.written < target {
                buf.push_str(&nginx_line(&mut p.rng, p.written));
                buf.push('\n');
                p.written += 1;
            }
            if !buf.is_empty() {
                p.file.write_all(buf.as_bytes())?;
                p.bytes += buf.len() as u64;
                total += p.written - before;
                buf.clear();
            }
            if o.rotate_bytes > 0 && p.bytes >= o.rotate_bytes {
                std::fs::rename(
                    &p.path,
                    p.path.with_extension(format!(
                        "{}.1",
                        p.path.extension().and_then(|e| e.to_str()).unwrap_or("log")
                    )),
                )?;
                p.file = open_append(&p.path)?;
                p.bytes = 0;
            }
        }
        if !active {
            break;
        }
        if o.rate > 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for p in &mut pods {
        p.file.flush()?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_look_like_nginx_and_fit_the_size() {
        let mut rng = fastrand::Rng::with_seed(1);
        for i in 0..200 {
            let l = nginx_line(&mut rng, i);
            assert!(l.len() > 120 && l.len() < 320, "{}", l.len());
            assert!(l.contains(" HTTP/1.1\" "));
            assert!(l.ends_with(&format!("seq={i}")));
        }
    }

    #[test]
    fn writes_pod_directories() {
        let d = tempfile::tempdir().expect("tmp");
        let o = GenerateOptions {
            dir: d.path().to_path_buf(),
            pod_dir: None,
            pods: 3,
            rate: 0,
            lines: 50,
            app: "nginx".into(),
            file: "access.log".into(),
            rotate_bytes: 0,
            seed: 1,
        };
        assert_eq!(run(&o, &AtomicBool::new(false)).expect("run"), 150);
        let text = std::fs::read_to_string(pod_dir(d.path(), "nginx", 2).join("access.log"))
            .expect("read");
        assert_eq!(text.lines().count(), 50);
    }
}
