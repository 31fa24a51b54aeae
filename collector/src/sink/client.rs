//! What the network sinks share: one blocking HTTP client with TLS and auth, the error
//! classification every HTTP backend gets, secrets, tag templates, and the per-sink metrics.
//!
//! [`HttpClient::post`] sends one request and turns the answer into either a 2xx [`Response`] or
//! a classified [`SinkError`]: timeouts, connection errors, 5xx, 408 and 429 are transient (with
//! `Retry-After` when the backend gave one), every other status is permanent and carries the
//! backend's own words. It never retries: the uploader does, with backoff.
//!
//! [`Secret`] keeps credentials out of logs and out of the resolved config; [`Auth`] reads them
//! from the config (which expands `${ENV}`) or from files. [`Template`] renders names such as
//! `logs-{namespace}` from a file's tags. [`SinkMetrics`] is the one section that names metrics,
//! so that it can move to the metrics module whole.
//!
//! This module knows nothing about any backend's wire format.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{SinkError, SinkErrorKind};
use crate::batch::FileMeta;

/// A credential: never printed, and rendered as `***` in the resolved config.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// `[sink.auth]`: how requests authenticate. Values may be `${ENV}` references; the `_file`
/// forms read the credential from a file (a mounted Kubernetes secret) at start-up.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Auth {
    /// `Authorization: Basic base64(user:password)`.
    Basic {
        /// User name.
        user: String,
        /// Password.
        #[serde(default)]
        password: Option<Secret>,
        /// File holding the password (trailing newline ignored).
        #[serde(default)]
        password_file: Option<PathBuf>,
    },
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// Token.
        #[serde(default)]
        token: Option<Secret>,
        /// File holding the token (trailing newline ignored).
        #[serde(default)]
        token_file: Option<PathBuf>,
    },
    /// `Authorization: ApiKey <key>` (Elasticsearch API keys, already base64-encoded).
    Apikey {
        /// The encoded key.
        #[serde(default)]
        key: Option<Secret>,
        /// File holding it (trailing newline ignored).
        #[serde(default)]
        key_file: Option<PathBuf>,
    },
}

impl Auth {
    /// Why this auth section can't work, if it can't (for config validation).
    pub fn problem(&self) -> Option<&'static str> {
        match self {
            Auth::Basic {
                password,
                password_file,
                ..
            } if password.is_some() == password_file.is_some() => {
                Some("basic auth needs exactly one of password and password_file")
            }
            Auth::Bearer { token, token_file } if token.is_some() == token_file.is_some() => {
                Some("bearer auth needs exactly one of token and token_file")
            }
            Auth::Apikey { key, key_file } if key.is_some() == key_file.is_some() => {
                Some("apikey auth needs exactly one of key and key_file")
            }
            _ => None,
        }
    }

    /// The `Authorization` header value.
    pub fn header(&self, sink: &'static str) -> Result<Secret, SinkError> {
        use base64::Engine as _;
        let read = |inline: &Option<Secret>, file: &Option<PathBuf>| -> Result<String, SinkError> {
            match (inline, file) {
                (Some(s), _) => Ok(s.0.clone()),
                (None, Some(p)) => read_secret_file(sink, p),
                (None, None) => Err(config_error(sink, "auth has no credential".into())),
            }
        };
        Ok(Secret(match self {
            Auth::Basic {
                user,
                password,
                password_file,
            } => {
                let pw = read(password, password_file)?;
                let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
                format!("Basic {b64}")
            }
            Auth::Bearer { token, token_file } => {
                format!("Bearer {}", read(token, token_file)?)
            }
            Auth::Apikey { key, key_file } => format!("ApiKey {}", read(key, key_file)?),
        }))
    }
}

/// Reads a credential file, without its trailing newline.
pub fn read_secret_file(sink: &'static str, path: &Path) -> Result<String, SinkError> {
    let s = std::fs::read_to_string(path).map_err(|e| {
        config_error(
            sink,
            format!("cannot read credential file {}: {e}", path.display()),
        )
    })?;
    Ok(s.trim_end_matches(['\r', '\n']).to_string())
}

/// A start-up problem (bad CA file, unreadable credential): permanent.
pub fn config_error(sink: &'static str, message: String) -> SinkError {
    SinkError {
        sink,
        kind: SinkErrorKind::Permanent,
        reason: "config",
        message,
        retry_after: None,
    }
}

/// The certificates of a PEM `ca_file`; errors name the file (unreadable, bad PEM, empty).
pub fn read_ca_file(
    sink: &'static str,
    ca: &Path,
) -> Result<Vec<ureq::tls::Certificate<'static>>, SinkError> {
    let pem = std::fs::read(ca)
        .map_err(|e| config_error(sink, format!("cannot read ca_file {}: {e}", ca.display())))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => {
                return Err(config_error(
                    sink,
                    format!("bad PEM in ca_file {}: {e}", ca.display()),
                ))
            }
        }
    }
    if certs.is_empty() {
        return Err(config_error(
            sink,
            format!("ca_file {} holds no certificate", ca.display()),
        ));
    }
    Ok(certs)
}

/// The connection options every HTTP sink takes (copied from its config section).
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Extra headers sent with every request (values may hold API keys).
    pub headers: Vec<(String, Secret)>,
    /// Authentication.
    pub auth: Option<Auth>,
    /// PEM file of CA certificates to trust instead of the built-in web roots.
    pub ca_file: Option<PathBuf>,
}

/// A 2xx answer.
#[derive(Debug)]
pub struct Response {
    /// The status.
    pub status: u16,
    /// The body (bounded by [`MAX_RESPONSE_BYTES`]).
    pub body: Vec<u8>,
}

/// Larger response bodies are cut: sinks only read small JSON answers.
pub const MAX_RESPONSE_BYTES: u64 = 64 << 20;

/// How much of an error body goes into messages.
const ERROR_BODY_CHARS: usize = 512;

/// A blocking HTTP/1.1 client (keep-alive pool, rustls) bound to one sink.
#[derive(Debug)]
pub struct HttpClient {
    sink: &'static str,
    agent: ureq::Agent,
    headers: Vec<(String, Secret)>,
    authorization: Option<Secret>,
    /// The sink's metrics.
    pub metrics: SinkMetrics,
}

impl HttpClient {
    /// Builds the client; reads the CA file and the credentials now.
    pub fn new(sink: &'static str, opts: &ClientOptions) -> Result<HttpClient, SinkError> {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(ca) = &opts.ca_file {
            let certs = read_ca_file(sink, ca)?;
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)));
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(opts.timeout))
            .http_status_as_error(false)
            .user_agent(concat!("voltail/", env!("CARGO_PKG_VERSION")))
            // Backends often close idle connections after a few seconds; don't reuse stale ones.
            .max_idle_age(Duration::from_secs(4))
            .tls_config(tls.build())
            .build()
            .new_agent();
        let authorization = opts.auth.as_ref().map(|a| a.header(sink)).transpose()?;
        Ok(HttpClient {
            sink,
            agent,
            headers: opts.headers.clone(),
            authorization,
            metrics: SinkMetrics::new(sink),
        })
    }

    /// POSTs `body` (already encoded as `headers` say) and classifies the answer.
    /// `raw_bytes` is the size before compression, for the metrics.
    pub fn post(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        raw_bytes: usize,
    ) -> Result<Response, SinkError> {
        let started = Instant::now();
        let _in_flight = self.metrics.in_flight();
        let mut req = self.agent.post(url);
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.0.as_str());
        }
        if let Some(a) = &self.authorization {
            req = req.header("Authorization", a.0.as_str());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let result = req.send(body);
        let result = match result {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after);
                let body = resp
                    .body_mut()
                    .with_config()
                    .limit(MAX_RESPONSE_BYTES)
                    .read_to_vec();
                match (status, body) {
                    (200..=299, Ok(body)) => Ok(Response { status, body }),
                    (200..=299, Err(e)) => Err(transport_error(self.sink, e)),
                    (_, body) => Err(status_error(
                        self.sink,
                        status,
                        &body.unwrap_or_default(),
                        retry_after,
                    )),
                }
            }
            Err(e) => Err(transport_error(self.sink, e)),
        };
        self.metrics.request_done(
            started.elapsed(),
            raw_bytes,
            body.len(),
            result.as_ref().err(),
        );
        result
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Classifies a non-2xx status: 408, 429 and 5xx are transient, the rest permanent.
pub fn status_error(
    sink: &'static str,
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
) -> SinkError {
    let (kind, reason) = match status {
        429 => (SinkErrorKind::Transient, "http_429"),
        408 => (SinkErrorKind::Transient, "timeout"),
        500..=599 => (SinkErrorKind::Transient, "http_5xx"),
        _ => (SinkErrorKind::Permanent, "http_4xx"),
    };
    SinkError {
        sink,
        kind,
        reason,
        message: format!("HTTP {status}: {}", snippet(body)),
        retry_after: if kind == SinkErrorKind::Transient {
            retry_after
        } else {
            None
        },
    }
}

/// The start of a backend's answer, on one line, for messages.
pub fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let s = s.trim();
    let mut out: String = s
        .chars()
        .take(ERROR_BODY_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().count() > ERROR_BODY_CHARS {
        out.push_str("...");
    }
    out
}

/// Everything that failed before a status arrived is transient, except a bad URL.
fn transport_error(sink: &'static str, e: ureq::Error) -> SinkError {
    let (kind, reason) = match &e {
        ureq::Error::Timeout(_) => (SinkErrorKind::Transient, "timeout"),
        ureq::Error::BadUri(_) | ureq::Error::Http(_) => (SinkErrorKind::Permanent, "config"),
        ureq::Error::Tls(_) => (SinkErrorKind::Transient, "tls"),
        _ => (SinkErrorKind::Transient, "connection"),
    };
    SinkError {
        sink,
        kind,
        reason,
        message: e.to_string(),
        retry_after: None,
    }
}

/// A batch's payload as a request body and its `Content-Encoding`: zstd or gzip as the
/// compressor stage left it, gzipped here when the sink asks for gzip (the stage only does zstd).
pub fn body(
    batch: &crate::batch::Batch,
    want: crate::config::Compression,
    level: i32,
) -> (std::borrow::Cow<'_, [u8]>, Option<&'static str>) {
    use crate::config::Compression;
    use std::borrow::Cow;
    match (batch.compression, want) {
        (Compression::Zstd, _) => (Cow::Borrowed(&batch.payload), Some("zstd")),
        (Compression::Gzip, _) => (Cow::Borrowed(&batch.payload), Some("gzip")),
        (Compression::None, Compression::Gzip) => (
            Cow::Owned(gzip(&batch.payload, level.max(0) as u32)),
            Some("gzip"),
        ),
        (Compression::None, _) => (Cow::Borrowed(&batch.payload), None),
    }
}

/// gzip of `data` at `level` (0..=9).
pub fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 4 + 64),
        flate2::Compression::new(level.min(9)),
    );
    // Writing into a Vec can't fail.
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}

/// A name made of literal text and `{tag}` references, rendered per file (`logs-{namespace}`).
/// `{source}` is the source name; a tag the file doesn't have renders as [`MISSING_TAG`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Tag(String),
}

/// What a missing tag renders as.
pub const MISSING_TAG: &str = "unknown";

impl Template {
    /// A template that renders `s` as it is.
    pub fn literal(s: &str) -> Template {
        Template {
            parts: vec![Part::Lit(s.to_string())],
        }
    }

    /// Parses `s`; errors name the problem.
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                if rest[..open].contains('}') {
                    return Err(format!("unopened }} in {s:?}"));
                }
                parts.push(Part::Lit(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("unclosed {{ in {s:?}"))?;
            let name = &after[..close];
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(format!("bad tag name {name:?} in {s:?}"));
            }
            parts.push(Part::Tag(name.to_string()));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unopened }} in {s:?}"));
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// Whether the template has no `{tag}` (renders the same for every file).
    pub fn is_constant(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Lit(_)))
    }

    /// Renders for `meta` into `out`.
    pub fn render_into(&self, meta: &FileMeta, out: &mut String) {
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Tag(t) if t == "source" => out.push_str(&meta.source),
                Part::Tag(t) => out.push_str(
                    meta.tags
                        .iter()
                        .find(|(k, _)| k == t)
                        .map(|(_, v)| v.as_str())
                        .unwrap_or(MISSING_TAG),
                ),
            }
        }
    }

    /// Renders for `meta`.
    pub fn render(&self, meta: &FileMeta) -> String {
        let mut s = String::new();
        self.render_into(meta, &mut s);
        s
    }
}

// ---- metrics ----------------------------------------------------------------------------------
// The only place in the sinks that names metrics: the lead can move this section into the
// metrics module as the sinks' events interface.

/// Per-sink request metrics, labelled `sink`.
#[derive(Debug, Clone)]
pub struct SinkMetrics {
    sink: &'static str,
    requests: metrics::Counter,
    in_flight: metrics::Gauge,
    latency: metrics::Histogram,
    bytes_raw: metrics::Counter,
    bytes_sent: metrics::Counter,
}

/// Decrements the in-flight gauge when dropped.
#[derive(Debug)]
pub struct InFlight(metrics::Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl SinkMetrics {
    /// Registers the metrics of `sink`.
    pub fn new(sink: &'static str) -> SinkMetrics {
        SinkMetrics {
            sink,
            requests: metrics::counter!("voltail_sink_requests_total", "sink" => sink),
            in_flight: metrics::gauge!("voltail_sink_requests_in_flight", "sink" => sink),
            latency: metrics::histogram!("voltail_sink_request_duration_seconds", "sink" => sink),
            bytes_raw: metrics::counter!("voltail_sink_request_bytes_total", "sink" => sink, "stage" => "raw"),
            bytes_sent: metrics::counter!("voltail_sink_request_bytes_total", "sink" => sink, "stage" => "sent"),
        }
    }

    /// Counts a request in flight until the guard drops.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.increment(1.0);
        InFlight(self.in_flight.clone())
    }

    /// Records a finished request.
    pub fn request_done(&self, took: Duration, raw: usize, sent: usize, error: Option<&SinkError>) {
        self.requests.increment(1);
        self.latency.record(took.as_secs_f64());
        self.bytes_raw.increment(raw as u64);
        self.bytes_sent.increment(sent as u64);
        if let Some(e) = error {
            self.failure(e.reason);
        }
    }

    /// Counts a failure by reason (also for item-level failures inside a 2xx answer).
    pub fn failure(&self, reason: &'static str) {
        metrics::counter!("voltail_sink_request_failures_total", "sink" => self.sink, "reason" => reason)
            .increment(1);
    }

    /// Counts items of a batch sent again inside one `send` or on the batch's retry.
    pub fn items_retried(&self, n: usize) {
        metrics::counter!("voltail_sink_items_retried_total", "sink" => self.sink)
            .increment(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_renders_tags_source_and_missing() {
        let m = FileMeta::new(
            1,
            Arc::from("nginx"),
            "/x".into(),
            vec![("ns".into(), "prod".into())],
            0,
        );
        let t = Template::parse("logs-{ns}-{source}.{pod}").expect("parse");
        assert_eq!(t.render(&m), "logs-prod-nginx.unknown");
        assert!(!t.is_constant());
        assert!(Template::parse("plain").expect("plain").is_constant());
        assert!(Template::parse("a{b").is_err());
        assert!(Template::parse("a}b").is_err());
        assert!(Template::parse("a{}b").is_err());
    }

    #[test]
    fn unopened_brace_before_a_tag_is_refused() {
        // Regression (fuzz target `http_encoder`): a `}` was refused only after the last tag,
        // so `logs}-{ns}` validated and rendered as `logs}-prod`.
        assert!(Template::parse("logs}-{ns}").is_err());
        assert!(Template::parse("{ns}}-{pod}").is_err());
        assert!(Template::parse("{ns}-{pod}").is_ok());
    }

    #[test]
    fn statuses_are_classified() {
        let e = status_error("t", 429, b"slow down", Some(Duration::from_secs(3)));
        assert_eq!(e.kind, SinkErrorKind::Transient);
        assert_eq!(e.retry_after, Some(Duration::from_secs(3)));
        assert_eq!(
            status_error("t", 503, b"", None).kind,
            SinkErrorKind::Transient
        );
        let e = status_error("t", 400, b"mapper_parsing_exception\nfield x", None);
        assert_eq!(e.kind, SinkErrorKind::Permanent);
        assert_eq!(e.message, "HTTP 400: mapper_parsing_exception field x");
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret("hunter2".into());
        assert_eq!(format!("{s:?}"), "Secret(***)");
        let a = Auth::Bearer {
            token: Some(s),
            token_file: None,
        };
        assert!(!format!("{a:?}").contains("hunter2"));
        assert_eq!(a.header("t").expect("header").0, "Bearer hunter2");
        let b = Auth::Basic {
            user: "u".into(),
            password: Some(Secret("p".into())),
            password_file: None,
        };
        assert_eq!(b.header("t").expect("header").0, "Basic dTpw");
        assert!(b.problem().is_none());
        let bad = Auth::Bearer {
            token: None,
            token_file: None,
        };
        assert!(bad.problem().is_some());
    }
}
