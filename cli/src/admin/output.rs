//! Presentation: aligned tables and `key: value` blocks for people, JSON for scripts, and the
//! small formatters (ages, sizes, short ids) they share. Everything goes to stdout; messages
//! about what happened go to stderr so that `--json` output stays parseable.

use std::io::Write;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::CliError;

/// A table with a header row; columns are as wide as their widest cell.
#[derive(Debug)]
pub(crate) struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(headers: &[&'static str]) -> Self {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let line = |out: &mut dyn Write, cells: &[&str]| -> std::io::Result<()> {
            let mut text = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    text.push_str(cell);
                } else {
                    let pad = widths.get(i).copied().unwrap_or(0);
                    text.push_str(&format!("{cell:<pad$}  "));
                }
            }
            writeln!(out, "{}", text.trim_end())
        };
        line(out, &self.headers)?;
        for row in &self.rows {
            let cells: Vec<&str> = row.iter().map(String::as_str).collect();
            line(out, &cells)?;
        }
        Ok(())
    }
}

/// Prints a table, or `none` on stderr when it has no rows (stdout stays a table).
pub(crate) fn print_table(table: &Table, what: &str) -> Result<(), CliError> {
    if table.rows.is_empty() {
        eprintln!("no {what}");
    }
    let mut out = std::io::stdout().lock();
    table.write(&mut out)?;
    Ok(())
}

/// Prints any value as pretty JSON followed by a newline.
pub(crate) fn print_json(value: &impl Serialize) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| {
        CliError::new(
            super::ExitCodeKind::Api,
            format!("encoding the output: {e}"),
        )
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    Ok(())
}

/// Prints text as it came, ending with one newline.
pub(crate) fn print_text(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", text.trim_end_matches('\n'))?;
    Ok(())
}

/// Prints `key: value` lines with the keys aligned.
pub(crate) fn print_fields(fields: &[(&str, String)]) -> Result<(), CliError> {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = std::io::stdout().lock();
    for (key, value) in fields {
        writeln!(out, "{:<width$} {value}", format!("{key}:"))?;
    }
    Ok(())
}

/// The first 8 characters of a UUID: enough to tell items apart and accepted back as an id.
pub(crate) fn short_id(id: &uuid::Uuid) -> String {
    id.simple().to_string().chars().take(8).collect()
}

/// `12s ago`, `5m ago`, `3h ago`, `2d ago`; `in 5m` for the future; `-` for none.
pub(crate) fn age(at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    let Some(at) = at else {
        return "-".to_owned();
    };
    let seconds = (now - at).num_seconds();
    let (n, future) = if seconds < 0 {
        (-seconds, true)
    } else {
        (seconds, false)
    };
    // Rounded to the nearest unit: a token made to last 30 days reads "in 30d", not "in 29d".
    let round = |unit: i64| (n + unit / 2) / unit;
    let span = match n {
        0..=119 => format!("{n}s"),
        120..=7_199 => format!("{}m", round(60)),
        7_200..=172_799 => format!("{}h", round(3600)),
        _ => format!("{}d", round(86_400)),
    };
    if future {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// RFC 3339 to the second, UTC.
pub(crate) fn timestamp(at: Option<DateTime<Utc>>) -> String {
    at.map_or_else(
        || "-".to_owned(),
        |t| t.format("%Y-%m-%d %H:%M:%SZ").to_string(),
    )
}

/// Bytes as GiB with one decimal (`79.6 GiB`), or `-`.
pub(crate) fn gib(bytes: Option<i64>) -> String {
    bytes.map_or_else(
        || "-".to_owned(),
        #[allow(clippy::cast_precision_loss)] // a display value
        |b| format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30)),
    )
}

/// A 0..=1 fraction as a percentage, or `-`.
pub(crate) fn percent(fraction: Option<f32>) -> String {
    fraction.map_or_else(|| "-".to_owned(), |f| format!("{:.0}%", f * 100.0))
}

/// An optional value, or `-`.
pub(crate) fn opt<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_trim_the_last() {
        let mut table = Table::new(&["ID", "NAME", "STATE"]);
        table.row(vec!["1".into(), "a-long-name".into(), "ready".into()]);
        table.row(vec!["22".into(), "b".into(), String::new()]);
        let mut out = Vec::new();
        table.write(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ID  NAME         STATE\n1   a-long-name  ready\n22  b\n"
        );
    }

    #[test]
    fn ages_read_naturally() {
        let now = DateTime::<Utc>::from_timestamp(1_000_000, 0).unwrap();
        let ago = |s: i64| age(Some(now - chrono::Duration::seconds(s)), now);
        assert_eq!(ago(5), "5s ago");
        assert_eq!(ago(600), "10m ago");
        assert_eq!(ago(3 * 3600), "3h ago");
        assert_eq!(ago(3 * 86_400), "3d ago");
        assert_eq!(ago(-300), "in 5m");
        assert_eq!(ago(-(30 * 86_400 - 1)), "in 30d");
        assert_eq!(age(None, now), "-");
    }
}
