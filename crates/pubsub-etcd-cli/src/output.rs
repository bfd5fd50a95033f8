//! Writing results: JSON documents, aligned tables (comfy-table), and telling a closed
//! stdout pipe apart from real failures.

use std::io::{self, BufWriter, Stdout, Write};

use serde::Serialize;

/// Buffered stdout. Callers flush when a result must be visible now (e.g.
/// before committing a consumed message).
pub fn stdout() -> BufWriter<Stdout> {
    BufWriter::with_capacity(64 * 1024, io::stdout())
}

/// Prints one JSON document on its own line.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    let mut out = stdout();
    serde_json::to_writer(&mut out, value)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// Rows under a header line, columns padded to line up. Columns holding
/// only numbers (or "-") are right-aligned so digits line up too.
#[derive(Debug)]
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: impl Into<Vec<&'static str>>) -> Self {
        Table {
            header: header.into(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: impl Into<Vec<String>>) {
        self.rows.push(cells.into());
    }

    pub fn render(&self) -> String {
        use comfy_table::{presets, CellAlignment, ContentArrangement};

        let columns = self.header.len();
        let mut table = comfy_table::Table::new();
        table
            .load_style(presets::NOTHING)
            .set_content_arrangement(ContentArrangement::Disabled)
            .set_header(self.header.clone());
        for row in &self.rows {
            table.add_row(row.clone());
        }
        for i in 0..columns {
            let numeric = !self.rows.is_empty()
                && self.rows.iter().all(|row| {
                    row.get(i)
                        .is_none_or(|cell| cell == "-" || cell.parse::<i128>().is_ok())
                });
            if let Some(column) = table.column_mut(i) {
                // Two spaces between columns, none around the table.
                column.set_padding((0, if i + 1 < columns { 2 } else { 0 }));
                if numeric {
                    column.set_cell_alignment(CellAlignment::Right);
                }
            }
        }
        let mut text = String::new();
        for line in table.lines() {
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }

    pub fn print(&self) -> anyhow::Result<()> {
        print_text(&self.render())
    }
}

/// Prints text as it is (include the trailing newline).
pub fn print_text(text: &str) -> anyhow::Result<()> {
    let mut out = stdout();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Runs `work` with a spinner and the elapsed time on stderr, when stderr
/// is a terminal and the work takes longer than a second: sweeps and
/// compactions can take minutes and report nothing until they end.
pub async fn with_spinner<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
    if !std::io::IsTerminal::is_terminal(&io::stderr()) {
        return work.await;
    }
    let mut work = std::pin::pin!(work);
    tokio::select! {
        done = &mut work => return done,
        () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
    }
    let spinner = indicatif::ProgressBar::new_spinner().with_message(what.to_string());
    spinner.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .expect("the spinner template is valid"),
    );
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let done = work.await;
    spinner.finish_and_clear();
    done
}

/// A bar counting `total` steps on stderr when it is a terminal, hidden
/// otherwise.
pub fn progress(what: &str, total: u64) -> indicatif::ProgressBar {
    if !std::io::IsTerminal::is_terminal(&io::stderr()) || total < 2 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total).with_message(what.to_string());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed}]")
            .expect("the progress template is valid"),
    );
    bar
}

/// `-` for an absent value, as tables show it.
pub fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// True when writing to stdout failed because its reader went away, which
/// is how a pipeline like `consume ... | head` ends normally.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<io::Error>())
        .any(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

/// An error and its causes on one line. Some errors repeat their cause in
/// their own message; such a cause is left out rather than printed twice.
/// The library's etcd errors already carry etcd's own message: the gRPC
/// and transport errors beneath them are debug output, not for people.
pub fn render_error(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
        if matches!(
            cause.downcast_ref::<pubsub_etcd::Error>(),
            Some(pubsub_etcd::Error::Etcd { .. })
        ) {
            break;
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_text_left_and_numbers_right() {
        let mut table = Table::new(["NAME", "PARTITIONS", "NOTE"]);
        table.row(["a".to_string(), "12".to_string(), "-".to_string()]);
        table.row(["long-name".to_string(), "3".to_string(), "x".to_string()]);
        assert_eq!(
            table.render(),
            "NAME       PARTITIONS  NOTE\n\
             a                  12  -\n\
             long-name           3  x\n"
        );
    }

    #[test]
    fn repeated_causes_are_printed_once() {
        #[derive(Debug)]
        struct Outer(io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "etcd get failed: {}", self.0)
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let error = anyhow::Error::new(Outer(io::Error::other("refused"))).context("connecting");
        assert_eq!(render_error(&error), "connecting: etcd get failed: refused");
        let pipe = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(is_broken_pipe(&pipe.context("writing")));
    }
}
