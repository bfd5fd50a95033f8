//! `admin compact | alarms | disarm | status | auto-compact`: etcd space
//! maintenance.

use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context as _;
use pubsub_etcd::{Alarm, AlarmKind, Client, CompactReport, CompactionRecord, HistoryStatus};
use serde::Serialize;

use crate::cli::{AdminCommand, Format};
use crate::output::{self, Table};

pub async fn run(client: &Client, command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::Compact { defrag, format } => {
            let what = if defrag {
                "compacting and defragmenting"
            } else {
                "compacting"
            };
            let report = output::with_spinner(what, client.compact_history(defrag)).await?;
            match format.format {
                Format::Json => output::print_json(&compact_json(&report))?,
                Format::Table => output::print_text(&compact_table(&report))?,
            }
            // The report is printed whole either way; a member that could
            // not be reached or defragmented still makes the run fail.
            let failed = report.members.iter().filter(|m| m.error.is_some()).count();
            if failed > 0 {
                anyhow::bail!(
                    "{failed} of {} etcd members reported an error",
                    report.members.len()
                );
            }
            Ok(())
        }
        AdminCommand::Alarms { format } => {
            let alarms = client.alarms().await?;
            match format.format {
                Format::Json => {
                    let list: Vec<_> = alarms.iter().map(AlarmJson::from).collect();
                    output::print_json(&list)
                }
                Format::Table => {
                    let mut table = Table::new(["MEMBER", "ALARM"]);
                    for a in &alarms {
                        table.row([member_id(a.member_id), alarm_name(a.kind).to_string()]);
                    }
                    table.print()
                }
            }
        }
        AdminCommand::Status { format } => {
            let status = client.history_status().await?;
            match format.format {
                Format::Json => output::print_json(&status_json(&status)),
                Format::Table => output::print_text(&status_table(&status)),
            }
        }
        AdminCommand::AutoCompact => {
            if !client.auto_compacting() {
                anyhow::bail!("admin auto-compact cannot run with --no-auto-compaction");
            }
            let shutdown =
                super::consume::shutdown_signal().context("cannot install signal handlers")?;
            eprintln!("taking part in automatic etcd history compaction; Ctrl-C to stop");
            shutdown.await;
            client.clone().close().await;
            Ok(())
        }
        AdminCommand::Disarm { format } => {
            let members = client.disarm_nospace().await?;
            let ids: Vec<String> = members.iter().map(|&id| member_id(id)).collect();
            match format.format {
                Format::Json => output::print_json(&Disarmed { disarmed: &ids }),
                Format::Table if ids.is_empty() => output::print_text("no NOSPACE alarm raised\n"),
                Format::Table => {
                    let text: String = ids
                        .iter()
                        .map(|id| format!("disarmed the NOSPACE alarm of member {id}\n"))
                        .collect();
                    output::print_text(&text)
                }
            }
        }
    }
}

/// A member id as etcd's own tools show it: in hexadecimal. (Also in JSON,
/// where a 64-bit number would lose digits in many readers.)
pub(super) fn member_id(id: u64) -> String {
    format!("{id:x}")
}

pub(super) fn alarm_name(kind: AlarmKind) -> &'static str {
    match kind {
        AlarmKind::NoSpace => "NOSPACE",
        AlarmKind::Corrupt => "CORRUPT",
        _ => "UNKNOWN",
    }
}

/// An alarm in JSON: the member in hexadecimal and etcd's name of the alarm.
#[derive(Serialize)]
pub(super) struct AlarmJson {
    member_id: String,
    alarm: &'static str,
}

impl From<&Alarm> for AlarmJson {
    fn from(alarm: &Alarm) -> Self {
        AlarmJson {
            member_id: member_id(alarm.member_id),
            alarm: alarm_name(alarm.kind),
        }
    }
}

/// `admin disarm` in JSON.
#[derive(Serialize)]
struct Disarmed<'a> {
    disarmed: &'a [String],
}

/// A [`CompactReport`] in JSON: the library's fields, member ids in hexadecimal.
#[derive(Serialize)]
struct CompactJson<'a> {
    revision: i64,
    already_compacted: bool,
    members: Vec<MemberSpaceJson<'a>>,
}

#[derive(Serialize)]
struct MemberSpaceJson<'a> {
    member_id: String,
    name: &'a str,
    endpoint: &'a str,
    db_size_before: Option<i64>,
    db_size_after: Option<i64>,
    db_size_in_use_after: Option<i64>,
    defragmented: bool,
    error: Option<&'a str>,
}

fn compact_json(report: &CompactReport) -> CompactJson<'_> {
    CompactJson {
        revision: report.revision,
        already_compacted: report.already_compacted,
        members: report
            .members
            .iter()
            .map(|m| MemberSpaceJson {
                member_id: member_id(m.member_id),
                name: &m.name,
                endpoint: &m.endpoint,
                db_size_before: m.db_size_before,
                db_size_after: m.db_size_after,
                db_size_in_use_after: m.db_size_in_use_after,
                defragmented: m.defragmented,
                error: m.error.as_deref(),
            })
            .collect(),
    }
}

fn compact_table(report: &CompactReport) -> String {
    let mut text = if report.already_compacted {
        format!(
            "etcd history was already compacted at revision {}\n\n",
            report.revision
        )
    } else {
        format!("compacted etcd history to revision {}\n\n", report.revision)
    };
    let mut table = Table::new([
        "MEMBER",
        "NAME",
        "ENDPOINT",
        "DB SIZE BEFORE",
        "DB SIZE AFTER",
        "IN USE AFTER",
        "DEFRAGMENTED",
        "ERROR",
    ]);
    for m in &report.members {
        table.row([
            member_id(m.member_id),
            output::or_dash((!m.name.is_empty()).then_some(&m.name)),
            output::or_dash((!m.endpoint.is_empty()).then_some(&m.endpoint)),
            output::or_dash(m.db_size_before),
            output::or_dash(m.db_size_after),
            output::or_dash(m.db_size_in_use_after),
            if m.defragmented { "yes" } else { "no" }.to_string(),
            output::or_dash(m.error.as_ref()),
        ]);
    }
    text.push_str(&table.render());
    text
}

/// A [`HistoryStatus`] in JSON, with the span of history it keeps.
#[derive(Serialize)]
struct StatusJson<'a> {
    revision: i64,
    oldest_revision: i64,
    history_span: i64,
    last_cycle: Option<&'a CompactionRecord>,
    last_cycle_error: Option<&'a str>,
    auto_compacting: bool,
    members: Vec<MemberJson<'a>>,
}

#[derive(Serialize)]
struct MemberJson<'a> {
    member_id: String,
    name: &'a str,
    endpoint: &'a str,
    db_size: Option<i64>,
    db_size_in_use: Option<i64>,
    error: Option<&'a str>,
}

fn status_json(status: &HistoryStatus) -> StatusJson<'_> {
    StatusJson {
        revision: status.revision,
        oldest_revision: status.oldest_revision,
        history_span: status.revision - status.oldest_revision,
        last_cycle: status.last_cycle.as_ref(),
        last_cycle_error: status.last_cycle_error.as_deref(),
        auto_compacting: status.auto_compacting,
        members: status
            .members
            .iter()
            .map(|m| MemberJson {
                member_id: member_id(m.member_id),
                name: &m.name,
                endpoint: &m.endpoint,
                db_size: m.db_size,
                db_size_in_use: m.db_size_in_use,
                error: m.error.as_deref(),
            })
            .collect(),
    }
}

fn status_table(status: &HistoryStatus) -> String {
    let last = match (&status.last_cycle, &status.last_cycle_error) {
        (Some(cycle), _) => {
            let at = UNIX_EPOCH + Duration::from_millis(cycle.at_ms.max(0) as u64);
            let at = humantime::format_rfc3339_seconds(at);
            if cycle.compacted == 0 {
                format!("none yet (revision {} recorded at {at})", cycle.revision)
            } else {
                format!(
                    "to revision {} at {at} (next to revision {})",
                    cycle.compacted, cycle.revision
                )
            }
        }
        (None, Some(error)) => format!("unknown: {error}"),
        (None, None) => "none yet".to_string(),
    };
    let mut text = format!(
        "revision:          {}\n\
         oldest revision:   {} (history span {} revisions)\n\
         last compaction:   {last}\n\
         auto compaction:   {}\n\n",
        status.revision,
        status.oldest_revision,
        status.revision - status.oldest_revision,
        if status.auto_compacting {
            "on (this client)"
        } else {
            "off (this client)"
        },
    );
    let mut table = Table::new(["MEMBER", "NAME", "ENDPOINT", "DB SIZE", "IN USE", "ERROR"]);
    for m in &status.members {
        table.row([
            member_id(m.member_id),
            output::or_dash((!m.name.is_empty()).then_some(&m.name)),
            output::or_dash((!m.endpoint.is_empty()).then_some(&m.endpoint)),
            output::or_dash(m.db_size),
            output::or_dash(m.db_size_in_use),
            output::or_dash(m.error.as_ref()),
        ]);
    }
    text.push_str(&table.render());
    text
}
