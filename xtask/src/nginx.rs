//! Realistic nginx access lines, and the identity each one carries.
//!
//! [`LineGen`] writes one line in nginx's `combined` format extended the way many deployments
//! extend it (`rt=`, `req=`, `ts=`): varied client IPs, methods, paths, statuses, sizes,
//! referers and user agents, each line 180-250 bytes plus its newline, from a seeded RNG so a
//! run can be repeated byte for byte.
//!
//! Every line carries a [`LineId`] in its `$request_id` (`req=<32 hex>`: file number, sequence
//! number, salt) and its write time in `$msec` (`ts=<unix seconds>.<millis>`). The verifier
//! finds both with [`parse_line`] in whatever a collector wrote, whatever its framing (JSON
//! escaping never touches hex digits or `=`), which is how every workload proves that no line
//! was lost or duplicated and how W3 measures latency.
//!
//! It does not write files: that is `workload`'s job.

/// Shortest line, without its newline.
pub const MIN_LEN: usize = 180;
/// Longest line, without its newline.
pub const MAX_LEN: usize = 250;

/// Which line this is: file number and sequence number within that file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LineId {
    /// Index of the file in the workload's file list.
    pub file: u32,
    /// 0-based number of the line within its file.
    pub seq: u64,
}

const METHODS: &[(&str, u32)] = &[
    ("GET", 70),
    ("POST", 18),
    ("PUT", 5),
    ("DELETE", 3),
    ("PATCH", 2),
    ("HEAD", 2),
];
const STATUSES: &[(u16, u32)] = &[
    (200, 70),
    (201, 4),
    (204, 3),
    (301, 2),
    (302, 3),
    (304, 6),
    (400, 2),
    (401, 2),
    (403, 1),
    (404, 4),
    (499, 1),
    (500, 1),
    (502, 1),
];
const PATHS: &[&str] = &[
    "/",
    "/healthz",
    "/api/v1/users",
    "/api/v1/orders",
    "/api/v2/cart/items",
    "/api/v1/products/search",
    "/static/js/app.min.js",
    "/static/css/site.css",
    "/images/logo.png",
    "/login",
    "/checkout/confirm",
    "/graphql",
    "/metrics",
    "/favicon.ico",
];
const REFERERS: &[&str] = &[
    "-",
    "-",
    "-",
    "https://shop.example.com/",
    "https://www.google.com/",
    "https://shop.example.com/cart",
    "https://m.example.com/home",
];
/// Short to long, so a line that came out too long can fall back to a shorter agent.
const AGENTS: &[&str] = &[
    "curl/8.5.0",
    "okhttp/4.12.0",
    "kube-probe/1.29",
    "Go-http-client/1.1",
    "python-requests/2.31.0",
    "Prometheus/2.51.0",
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/124.0 Safari/537.36",
];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];
const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

fn weighted<T: Copy>(rng: &mut fastrand::Rng, table: &[(T, u32)]) -> T {
    let total: u32 = table.iter().map(|(_, w)| w).sum();
    let mut pick = rng.u32(0..total);
    for (v, w) in table {
        if pick < *w {
            return *v;
        }
        pick -= w;
    }
    table[0].0
}

/// Formats unix milliseconds as nginx's `$time_local` in UTC: `29/Nov/2026:21:07:30 +0000`.
pub fn time_local(unix_ms: u64) -> String {
    let (y, m, d, sod) = civil(unix_ms);
    format!(
        "{d:02}/{}/{y}:{:02}:{:02}:{:02} +0000",
        MONTHS[(m - 1) as usize],
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Formats unix milliseconds as RFC 3339 in UTC, to the second.
pub fn rfc3339(unix_ms: u64) -> String {
    let (y, m, d, sod) = civil(unix_ms);
    format!(
        "{y}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Year, month, day and second of the day of unix milliseconds (UTC).
fn civil(unix_ms: u64) -> (i64, i64, i64, u64) {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, sod)
}

/// A seeded source of nginx access lines.
#[derive(Debug)]
pub struct LineGen {
    rng: fastrand::Rng,
}

impl LineGen {
    /// Same seed, same lines.
    pub fn new(seed: u64) -> LineGen {
        LineGen {
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// Appends one line (with its newline) for `id`, stamped `unix_ms`, to `out`.
    pub fn line(&mut self, id: LineId, unix_ms: u64, out: &mut Vec<u8>) {
        use std::fmt::Write as _;
        let r = &mut self.rng;
        let target = r.usize(MIN_LEN..=MAX_LEN);
        let ip = match r.u8(0..4) {
            0 => format!("10.{}.{}.{}", r.u8(0..=255), r.u8(0..=255), r.u8(1..=254)),
            1 => format!("192.168.{}.{}", r.u8(0..=255), r.u8(1..=254)),
            _ => format!(
                "{}.{}.{}.{}",
                r.u8(1..=223),
                r.u8(0..=255),
                r.u8(0..=255),
                r.u8(1..=254)
            ),
        };
        let method = weighted(r, METHODS);
        let status = weighted(r, STATUSES);
        let mut path = PATHS[r.usize(..PATHS.len())].to_string();
        if path.starts_with("/api/") && r.bool() {
            let _ = write!(path, "/{}", r.u32(1..1_000_000));
        }
        let bytes = match status {
            204 | 304 => 0,
            _ => r.u32(0..250_000),
        };
        let mut referer = REFERERS[r.usize(..REFERERS.len())];
        let mut agent = r.usize(..AGENTS.len());
        let rt = r.u32(0..2500);
        let salt = r.u32(..);
        let rid = format!("{:08x}{:016x}{salt:08x}", id.file, id.seq);
        let time = time_local(unix_ms);
        let render = |path: &str, referer: &str, agent: &str| {
            format!(
                "{ip} - - [{time}] \"{method} {path} HTTP/1.1\" {status} {bytes} \"{referer}\" \
                 \"{agent}\" rt={}.{:03} req={rid} ts={}.{:03}",
                rt / 1000,
                rt % 1000,
                unix_ms / 1000,
                unix_ms % 1000
            )
        };
        let mut line = render(&path, referer, AGENTS[agent]);
        // Too long: drop the referer, then take shorter agents until it fits.
        while line.len() > target && (referer != "-" || agent > 0) {
            if referer != "-" {
                referer = "-";
            } else {
                agent -= 1;
            }
            line = render(&path, referer, AGENTS[agent]);
        }
        // Too short: a query string makes up the difference.
        if line.len() < target {
            let mut need = target - line.len();
            let q = if path.contains('?') { "&" } else { "?" };
            if need >= 4 {
                path.push_str(q);
                path.push_str("q=");
                need -= 3;
            }
            for _ in 0..need {
                path.push(char::from(ALNUM[r.usize(..ALNUM.len())]));
            }
            line = render(&path, referer, AGENTS[agent]);
        }
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
}

/// What [`parse_line`] finds in a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// Which line.
    pub id: LineId,
    /// Its write time, unix milliseconds.
    pub unix_ms: u64,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn hex(b: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(b).ok()?;
    u64::from_str_radix(s, 16).ok()
}

/// Finds the `req=` and `ts=` fields in anything that contains one of our lines (a raw line, a
/// JSON event, a peer's output line).
pub fn parse_line(text: &[u8]) -> Option<Parsed> {
    let at = find(text, b" req=")? + 5;
    let rid = text.get(at..at + 32)?;
    let file = u32::try_from(hex(&rid[..8])?).ok()?;
    let seq = hex(&rid[8..24])?;
    let rest = &text[at + 32..];
    let ts = rest.strip_prefix(b" ts=")?;
    let end = ts
        .iter()
        .position(|c| !(c.is_ascii_digit() || *c == b'.'))
        .unwrap_or(ts.len());
    let ts = std::str::from_utf8(&ts[..end]).ok()?;
    let (s, ms) = ts.split_once('.')?;
    let unix_ms = s.parse::<u64>().ok()? * 1000 + ms.parse::<u64>().ok()?;
    Some(Parsed {
        id: LineId { file, seq },
        unix_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_180_to_250_bytes_and_parse_back() {
        let mut g = LineGen::new(7);
        let mut buf = Vec::new();
        for seq in 0..20_000 {
            buf.clear();
            let id = LineId { file: 12, seq };
            g.line(id, 1_764_450_000_123 + seq, &mut buf);
            assert_eq!(buf.last(), Some(&b'\n'));
            let line = &buf[..buf.len() - 1];
            assert!(
                (MIN_LEN..=MAX_LEN).contains(&line.len()),
                "{} bytes: {}",
                line.len(),
                String::from_utf8_lossy(line)
            );
            let p = parse_line(line).expect("our own line parses");
            assert_eq!(p.id, id);
            assert_eq!(p.unix_ms, 1_764_450_000_123 + seq);
        }
    }

    #[test]
    fn same_seed_same_lines() {
        let (mut a, mut b) = (LineGen::new(3), LineGen::new(3));
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for seq in 0..100 {
            a.line(LineId { file: 0, seq }, 0, &mut x);
            b.line(LineId { file: 0, seq }, 0, &mut y);
        }
        assert_eq!(x, y);
    }

    #[test]
    fn parses_inside_json() {
        let mut buf = Vec::new();
        LineGen::new(1).line(LineId { file: 5, seq: 9 }, 42_001, &mut buf);
        let line = String::from_utf8(buf).expect("ascii");
        let json = serde_json::json!({ "message": line.trim_end() }).to_string();
        let p = parse_line(json.as_bytes()).expect("parses in json");
        assert_eq!(p.id, LineId { file: 5, seq: 9 });
        assert_eq!(p.unix_ms, 42_001);
    }

    #[test]
    fn time_local_formats_like_nginx() {
        assert_eq!(time_local(1_764_450_050_000), "29/Nov/2025:21:00:50 +0000");
        assert_eq!(time_local(0), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(rfc3339(1_764_450_050_000), "2025-11-29T21:00:50Z");
    }
}
