//! Metrics and health: the events interface the other modules call, the Prometheus exporter,
//! and the HTTP endpoint serving `GET /metrics`, `GET /health` and `GET /ready`.
//!
//! Modules never name metrics: they call methods of [`Events`], which holds registered handles
//! (an atomic add on the hot path, no lookup). Without an installed recorder (unit tests) every
//! call is a no-op. Per-file series are never created: file counts are unbounded; per-source
//! and per-reason series are bounded by configuration and code.
//!
//! [`Health`] says what the process is doing (`starting`, `waiting_for_lock`, `running`,
//! `stopping`); `/health` answers 200 while the process works (liveness) and `/ready` 200 only
//! while it ships (readiness).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Registered metric handles.
#[derive(Clone)]
pub struct Events {
    read_bytes: Counter,
    read_lines: Counter,
    lines_split: Counter,
    invalid_utf8: Counter,
    symlinks_refused: Counter,
    files_watched: Gauge,
    files_opened: Counter,
    files_released: Counter,
    rotations: Counter,
    truncations: Counter,
    read_errors: Counter,
    untagged_files: Counter,
    poll_round: Histogram,
    discovery_seconds: Histogram,
    sink_raw: Counter,
    sink_compressed: Counter,
    sink_batches: Counter,
    sink_retries: Counter,
    sink_in_flight: Gauge,
    dead_letter_events: Counter,
    checkpoint_flushes: Counter,
    checkpoint_errors: Counter,
    checkpoint_age: Gauge,
    probe_wakeups: Counter,
    hints_dropped: Counter,
    discovery_full_rescan: Gauge,
    probe_uncollected: Gauge,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events")
    }
}

impl Events {
    /// Registers the handles with the installed recorder (or no-ops without one).
    pub fn new() -> Events {
        Events {
            read_bytes: counter!("voltail_read_bytes_total"),
            read_lines: counter!("voltail_read_lines_total"),
            lines_split: counter!("voltail_lines_split_total"),
            invalid_utf8: counter!("voltail_invalid_utf8_lines_total"),
            symlinks_refused: counter!("voltail_symlinks_refused_total"),
            files_watched: gauge!("voltail_files_watched"),
            files_opened: counter!("voltail_files_opened_total"),
            files_released: counter!("voltail_files_released_total"),
            rotations: counter!("voltail_rotations_total"),
            truncations: counter!("voltail_truncations_total"),
            read_errors: counter!("voltail_read_errors_total"),
            untagged_files: counter!("voltail_untagged_files_total"),
            poll_round: histogram!("voltail_poll_round_seconds"),
            discovery_seconds: histogram!("voltail_discovery_seconds"),
            sink_raw: counter!("voltail_sink_bytes_total", "kind" => "raw"),
            sink_compressed: counter!("voltail_sink_bytes_total", "kind" => "compressed"),
            sink_batches: counter!("voltail_sink_batches_total"),
            sink_retries: counter!("voltail_sink_retries_total"),
            sink_in_flight: gauge!("voltail_sink_in_flight"),
            dead_letter_events: counter!("voltail_sink_dead_letter_events_total"),
            checkpoint_flushes: counter!("voltail_checkpoint_flushes_total"),
            checkpoint_errors: counter!("voltail_checkpoint_errors_total"),
            checkpoint_age: gauge!("voltail_checkpoint_age_seconds"),
            probe_wakeups: counter!("voltail_probe_wakeups_total"),
            hints_dropped: counter!("voltail_probe_hints_dropped_total"),
            discovery_full_rescan: gauge!("voltail_discovery_full_rescan_passes"),
            probe_uncollected: gauge!("voltail_probe_uncollected_files"),
        }
    }

    /// Bytes and lines read and framed in one poll round.
    pub fn read(&self, bytes: u64, lines: u64) {
        self.read_bytes.increment(bytes);
        self.read_lines.increment(lines);
    }
    /// A long line was cut into pieces (counted once per extra piece).
    pub fn line_split(&self, pieces: u64) {
        self.lines_split.increment(pieces);
    }
    /// Lines that were not valid in their encoding (shipped with U+FFFD).
    pub fn invalid_utf8(&self, n: u64) {
        self.invalid_utf8.increment(n);
    }
    /// A symlink to outside the include roots was refused.
    pub fn symlink_refused(&self) {
        self.symlinks_refused.increment(1);
    }
    /// How many files are tracked now.
    pub fn files_watched(&self, n: usize) {
        self.files_watched.set(n as f64);
    }
    /// A file was opened for tailing.
    pub fn file_opened(&self) {
        self.files_opened.increment(1);
    }
    /// A finished file was released.
    pub fn file_released(&self) {
        self.files_released.increment(1);
    }
    /// A tracked path now names another file (rename rotation, delete + recreate).
    pub fn rotation(&self) {
        self.rotations.increment(1);
    }
    /// A file shrank below the read offset (copytruncate).
    pub fn truncation(&self) {
        self.truncations.increment(1);
    }
    /// A stat or read failed with something other than a vanished file.
    pub fn read_error(&self) {
        self.read_errors.increment(1);
    }
    /// A file's path did not match its source's `path_tags`.
    pub fn untagged_file(&self) {
        self.untagged_files.increment(1);
    }
    /// One poll round over the due files took `d`.
    pub fn poll_round(&self, d: Duration) {
        self.poll_round.record(d.as_secs_f64());
    }
    /// One discovery pass took `d`.
    pub fn discovery(&self, d: Duration) {
        self.discovery_seconds.record(d.as_secs_f64());
    }
    /// Discovery passes between full re-lists now: 12 to 96 while directory mtimes have shown
    /// every change, 12 for good once one hid a change (see `discovery`).
    pub fn discovery_full_rescan(&self, passes: u64) {
        self.discovery_full_rescan.set(passes as f64);
    }
    /// Files the probe saw written under a watched mount in the last minute that no source
    /// collects (their writes are muted in the probe meanwhile).
    pub fn probe_uncollected(&self, n: usize) {
        self.probe_uncollected.set(n as f64);
    }
    /// A batch was delivered.
    pub fn sink_delivered(&self, raw: usize, compressed: usize) {
        self.sink_batches.increment(1);
        self.sink_raw.increment(raw as u64);
        self.sink_compressed.increment(compressed as u64);
    }
    /// Batches being delivered now (sent or waiting to retry), at most the sink's `concurrency`.
    pub fn sink_in_flight(&self, n: usize) {
        self.sink_in_flight.set(n as f64);
    }
    /// A delivery attempt failed.
    pub fn sink_error(&self, sink: &'static str, reason: &'static str, transient: bool) {
        counter!("voltail_sink_errors_total", "sink" => sink, "reason" => reason,
            "kind" => if transient { "transient" } else { "permanent" })
        .increment(1);
        if transient {
            self.sink_retries.increment(1);
        }
    }
    /// Events written to the dead-letter directory.
    pub fn dead_lettered(&self, events: usize) {
        self.dead_letter_events.increment(events as u64);
    }
    /// The checkpoint was made durable.
    pub fn checkpoint_flushed(&self) {
        self.checkpoint_flushes.increment(1);
    }
    /// Making the checkpoint durable failed.
    pub fn checkpoint_error(&self) {
        self.checkpoint_errors.increment(1);
    }
    /// Seconds since the checkpoint was last made durable.
    pub fn checkpoint_age(&self, secs: f64) {
        self.checkpoint_age.set(secs);
    }
    /// What loading the checkpoint found (`clean`, `fresh`, `recovered`, `lost`).
    pub fn checkpoint_loaded(&self, outcome: &'static str) {
        counter!("voltail_checkpoint_loads_total", "outcome" => outcome).increment(1);
    }
    /// Bytes on disk not yet acknowledged, per source.
    pub fn lag(&self, source: &str, bytes: u64) {
        gauge!("voltail_lag_bytes", "source" => source.to_string()).set(bytes as f64);
    }
    /// The read backend in use.
    pub fn reader_backend(&self, name: &'static str) {
        gauge!("voltail_reader_backend", "backend" => name).set(1.0);
    }
    /// A probe hint made a file due before its poll time.
    pub fn probe_wakeup(&self) {
        self.probe_wakeups.increment(1);
    }
    /// A probe hint was dropped because the tailer's hint queue was full.
    pub fn hint_dropped(&self) {
        self.hints_dropped.increment(1);
    }
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

/// What the process is doing, for `/health` and `/ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Loading the checkpoint, recovering the sink.
    Starting,
    /// Another instance holds the `data_dir` lock.
    WaitingForLock {
        /// What the lock file says about the holder.
        holder: String,
    },
    /// Shipping.
    Running,
    /// Draining after SIGTERM.
    Stopping,
}

/// Shared process status.
#[derive(Debug, Default)]
pub struct Health {
    status: Mutex<Option<Status>>,
}

impl Health {
    /// Sets the status.
    pub fn set(&self, s: Status) {
        if let Ok(mut g) = self.status.lock() {
            *g = Some(s);
        }
    }

    /// `(ready, json)`.
    fn render(&self) -> (bool, String) {
        let s = self
            .status
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or(Status::Starting);
        let (name, detail) = match &s {
            Status::Starting => ("starting", String::new()),
            Status::WaitingForLock { holder } => ("waiting_for_lock", holder.clone()),
            Status::Running => ("running", String::new()),
            Status::Stopping => ("stopping", String::new()),
        };
        let mut json = format!("{{\"status\":\"{name}\"");
        if !detail.is_empty() {
            let mut esc = Vec::new();
            crate::batch::escape_json(detail.as_bytes(), &mut esc);
            json.push_str(",\"lock_holder\":\"");
            json.push_str(&String::from_utf8_lossy(&esc));
            json.push('"');
        }
        json.push_str(",\"version\":\"");
        json.push_str(env!("CARGO_PKG_VERSION"));
        json.push_str("\"}\n");
        (s == Status::Running, json)
    }
}

/// Errors starting the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The recorder could not be installed (already installed).
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Installs the Prometheus recorder (once per process).
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ])
        .map_err(|e| MetricsError::Recorder(e.to_string()))?
        .install_recorder()
        .map_err(|e| MetricsError::Recorder(e.to_string()))?;
    let h = handle.clone();
    // The exporter keeps histogram summaries; upkeep bounds their memory.
    std::thread::Builder::new()
        .name("voltail-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            h.run_upkeep();
        })
        .map_err(|e| MetricsError::Recorder(e.to_string()))?;
    Ok(handle)
}

/// Serves `/metrics`, `/health` and `/ready` on `addr` from a thread; returns the bound address.
pub fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    health: Arc<Health>,
) -> Result<SocketAddr, MetricsError> {
    let listener = TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    std::thread::Builder::new()
        .name("voltail-http".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                let mut reader = BufReader::new(&conn);
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                // Drain the headers (bounded) so the client sees a clean close.
                let mut hdr = String::new();
                for _ in 0..100 {
                    hdr.clear();
                    match reader.read_line(&mut hdr) {
                        Ok(n) if n > 2 => continue,
                        _ => break,
                    }
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/");
                let (code, ctype, body) = match path {
                    "/metrics" => (200, "text/plain; version=0.0.4", handle.render()),
                    "/health" => (200, "application/json", health.render().1),
                    "/ready" => {
                        let (ready, json) = health.render();
                        (if ready { 200 } else { 503 }, "application/json", json)
                    }
                    _ => (404, "text/plain", "not found: try /metrics, /health or /ready\n".to_string()),
                };
                let reason = match code {
                    200 => "OK",
                    503 => "Service Unavailable",
                    _ => "Not Found",
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .map_err(|source| MetricsError::Bind { addr, source })?;
    Ok(bound)
}
