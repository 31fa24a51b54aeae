//! A minimal HTTP/1.1 receiver on 127.0.0.1 for benchmarking the `http` sink: it takes
//! `POST`s of NDJSON (zstd, or plain), answers 204, and appends every body whole to one file
//! in its directory, named like the file sink's segments (`voltail-http.ndjson.zst` or
//! `.ndjson`) so [`crate::verify::Checker::voltail_dir`] decodes and counts every line after
//! the run, exactly as for the file sink.
//!
//! It only stores bytes while the collector runs (decoding and checking happen afterwards), so
//! the receiving side competes as little as possible with the collector being measured. It is
//! not a general server: one request per read, `Content-Length` bodies only.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};

/// What the receiver writes to, per `Content-Encoding`.
struct Sinks {
    zstd: Mutex<File>,
    plain: Mutex<File>,
}

/// A running receiver; stops accepting when dropped.
pub struct Receiver {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Requests answered.
    pub requests: Arc<AtomicU64>,
    /// Body bytes received.
    pub bytes: Arc<AtomicU64>,
}

impl Receiver {
    /// Listens on 127.0.0.1 and writes bodies into `dir` (created).
    pub fn start(dir: &Path) -> Result<Receiver> {
        std::fs::create_dir_all(dir)?;
        let open = |name: &str| -> Result<Mutex<File>> {
            let p: PathBuf = dir.join(name);
            Ok(Mutex::new(
                File::create(&p).with_context(|| format!("create {}", p.display()))?,
            ))
        };
        let sinks = Arc::new(Sinks {
            zstd: open("voltail-http.ndjson.zst")?,
            plain: open("voltail-http.ndjson")?,
        });
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the receiver")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (s, r, b) = (stop.clone(), requests.clone(), bytes.clone());
        std::thread::Builder::new()
            .name("bench-receiver".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (sinks, r, b) = (sinks.clone(), r.clone(), b.clone());
                    let _ = std::thread::Builder::new()
                        .name("bench-receiver-conn".into())
                        .spawn(move || {
                            if let Err(e) = serve(conn, &sinks, &r, &b) {
                                eprintln!("bench: receiver: {e:#}");
                            }
                        });
                }
            })?;
        Ok(Receiver {
            addr,
            stop,
            requests,
            bytes,
        })
    }

    /// The URL to give the sink.
    pub fn url(&self) -> String {
        format!("http://{}/ingest", self.addr)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// Serves one keep-alive connection until the client closes it.
fn serve(conn: TcpStream, sinks: &Sinks, requests: &AtomicU64, bytes: &AtomicU64) -> Result<()> {
    conn.set_nodelay(true)?;
    let mut w = conn.try_clone()?;
    let mut r = BufReader::with_capacity(1 << 20, conn);
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut len = 0usize;
        let mut encoding = String::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().context("content-length")?;
                } else if k.eq_ignore_ascii_case("content-encoding") {
                    encoding = v.trim().to_ascii_lowercase();
                }
            }
        }
        body.resize(len, 0);
        r.read_exact(&mut body)?;
        let status = match encoding.as_str() {
            "zstd" | "" => {
                let f = if encoding.is_empty() {
                    &sinks.plain
                } else {
                    &sinks.zstd
                };
                // A whole body per write: a zstd frame, or NDJSON ending in a newline.
                f.lock()
                    .map_err(|_| anyhow::anyhow!("receiver file lock poisoned"))?
                    .write_all(&body)?;
                requests.fetch_add(1, Ordering::Relaxed);
                bytes.fetch_add(len as u64, Ordering::Relaxed);
                "204 No Content"
            }
            _ => "415 Unsupported Media Type",
        };
        write!(w, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n")?;
    }
}
