//! `voltail checkpoint`: the checkpoint as a table, one row per tracked file, with what is on
//! disk now (size, lag). Reads the checkpoint without taking the lock or changing anything, so
//! it is safe to run beside a running collector.

use std::io::Write;
use std::os::unix::fs::MetadataExt;

use crate::checkpoint::{self, LoadOutcome};
use crate::config::Config;

/// Prints the checkpoint of `cfg.data_dir`.
pub fn print_checkpoint(cfg: &Config, out: &mut impl Write) -> Result<(), std::io::Error> {
    let loaded = checkpoint::read_only(&cfg.data_dir).map_err(std::io::Error::other)?;
    let state = match &loaded.outcome {
        LoadOutcome::Fresh => "none (first start)".to_string(),
        LoadOutcome::Clean { generation } => format!("ok, generation {generation}"),
        LoadOutcome::Recovered { problem, from } => {
            format!("damaged ({problem}); would recover from {from}")
        }
        LoadOutcome::Lost { problem } => format!("unreadable ({problem})"),
    };
    writeln!(
        out,
        "# checkpoint {}: {state}",
        cfg.data_dir.join(checkpoint::FILE_NAME).display()
    )?;
    let mut entries = loaded.entries;
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let rows: Vec<[String; 6]> = entries
        .iter()
        .map(|e| {
            let (size, lag, note) = match std::fs::metadata(&e.path) {
                Ok(m) if m.ino() == e.id.ino => (
                    m.len().to_string(),
                    m.len().saturating_sub(e.offset).to_string(),
                    "",
                ),
                Ok(_) => (
                    "-".into(),
                    "-".into(),
                    "path now names another file (rotated)",
                ),
                Err(_) => ("-".into(), "-".into(), "gone"),
            };
            [
                e.path.clone(),
                e.id.to_string(),
                e.offset.to_string(),
                size,
                lag,
                note.to_string(),
            ]
        })
        .collect();
    let header = ["PATH", "IDENTITY", "ACKED", "SIZE", "LAG", "NOTE"];
    let mut w = header.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |out: &mut dyn Write, r: [&str; 6]| -> std::io::Result<()> {
        writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {:>w4$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3],
            w4 = w[4]
        )
    };
    line(out, header)?;
    let mut total_lag = 0u64;
    for r in &rows {
        total_lag += r[4].parse::<u64>().unwrap_or(0);
        line(out, [&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]])?;
    }
    writeln!(
        out,
        "# {} files, {} bytes not yet acknowledged",
        rows.len(),
        total_lag
    )?;
    Ok(())
}
