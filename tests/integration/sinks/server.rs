//! A small HTTP/1.1 server on 127.0.0.1 for the sink tests: it hands every request, decoded
//! just enough (method, target, headers, Content-Length or chunked body), to a handler that
//! decides the answer, including failures: any status, a delay, or a dropped connection.
//! [`Server::start_tls`] serves the same over rustls with a given certificate.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the server does with a request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Answer with a status, extra headers and a body.
    Status(u16, Vec<(String, String)>, Vec<u8>),
    /// Close the connection without answering.
    Drop,
    /// Wait, then do the inner reply.
    Delay(Duration, Box<Reply>),
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::Status(200, vec![], b"{}".to_vec())
    }
    pub fn status(code: u16, body: &str) -> Reply {
        Reply::Status(code, vec![], body.as_bytes().to_vec())
    }
}

type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

/// A running server; stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Requests received so far.
    pub requests: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Server {
        Server::start_with(None, "127.0.0.1:0".parse().expect("addr"), handler)
    }

    /// Serves at `addr` (e.g. the address of a server that was dropped: the backend is back).
    pub fn start_at(
        addr: SocketAddr,
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> Server {
        Server::start_with(None, addr, handler)
    }

    /// Serves HTTPS with `tls`.
    pub fn start_tls(
        tls: Arc<rustls::ServerConfig>,
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> Server {
        Server::start_with(Some(tls), "127.0.0.1:0".parse().expect("addr"), handler)
    }

    fn start_with(
        tls: Option<Arc<rustls::ServerConfig>>,
        at: SocketAddr,
        handler: impl Fn(&Request) -> Reply + Send + Sync + 'static,
    ) -> Server {
        let listener = TcpListener::bind(at).unwrap_or_else(|e| panic!("bind {at}: {e}"));
        let addr = listener.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let handler: Arc<Handler> = Arc::new(handler);
        let (s, r) = (stop.clone(), requests.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (h, r, s) = (handler.clone(), r.clone(), s.clone());
                let tls = tls.clone();
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                    match tls {
                        None => serve(conn, &*h, &r, &s),
                        Some(cfg) => {
                            let Ok(sc) = rustls::ServerConnection::new(cfg) else {
                                return;
                            };
                            serve(rustls::StreamOwned::new(sc, conn), &*h, &r, &s)
                        }
                    }
                });
            }
        });
        Server {
            addr,
            stop,
            requests,
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve<S: Read + Write>(conn: S, handler: &Handler, count: &AtomicUsize, stop: &AtomicBool) {
    let mut r = BufReader::new(conn);
    loop {
        let Some(req) = read_request(&mut r) else {
            return;
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        count.fetch_add(1, Ordering::SeqCst);
        let mut reply = handler(&req);
        loop {
            match reply {
                Reply::Delay(d, inner) => {
                    std::thread::sleep(d);
                    reply = *inner;
                }
                Reply::Drop => return,
                Reply::Status(code, headers, body) => {
                    let mut head =
                        format!("HTTP/1.1 {code} X\r\nContent-Length: {}\r\n", body.len());
                    for (k, v) in headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    let w = r.get_mut();
                    if w.write_all(head.as_bytes()).is_err()
                        || w.write_all(&body).is_err()
                        || w.flush().is_err()
                    {
                        return;
                    }
                    break;
                }
            }
        }
    }
}

fn read_request<S: Read>(r: &mut BufReader<S>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut req = Request {
        method,
        target,
        headers,
        body: Vec::new(),
    };
    if let Some(n) = req.header("content-length") {
        let n: usize = n.parse().ok()?;
        let mut body = vec![0; n];
        r.read_exact(&mut body).ok()?;
        req.body = body;
    } else if req
        .header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            req.body.extend_from_slice(&chunk[..n]);
        }
    }
    Some(req)
}
