//! `admin compact | alarms | disarm`: etcd space maintenance.

use pubsub_etcd::{AlarmKind, Client, CompactReport};
use serde_json::json;

use crate::cli::{AdminCommand, Format};
use crate::output::{self, Table};

pub async fn run(client: &Client, command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::Compact { defrag, format } => {
            let report = client.compact_history(defrag).await?;
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
                    let list: Vec<_> = alarms
                        .iter()
                        .map(|a| {
                            json!({
                                "member_id": member_id(a.member_id),
                                "alarm": alarm_name(a.kind),
                            })
                        })
                        .collect();
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
        AdminCommand::Disarm { format } => {
            let members = client.disarm_nospace().await?;
            let ids: Vec<String> = members.iter().map(|&id| member_id(id)).collect();
            match format.format {
                Format::Json => output::print_json(&json!({ "disarmed": ids })),
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
fn member_id(id: u64) -> String {
    format!("{id:x}")
}

fn alarm_name(kind: AlarmKind) -> &'static str {
    match kind {
        AlarmKind::NoSpace => "NOSPACE",
        AlarmKind::Corrupt => "CORRUPT",
        _ => "UNKNOWN",
    }
}

fn compact_json(report: &CompactReport) -> serde_json::Value {
    let members: Vec<_> = report
        .members
        .iter()
        .map(|m| {
            json!({
                "member_id": member_id(m.member_id),
                "name": m.name,
                "endpoint": m.endpoint,
                "db_size_before": m.db_size_before,
                "db_size_after": m.db_size_after,
                "db_size_in_use_after": m.db_size_in_use_after,
                "defragmented": m.defragmented,
                "error": m.error,
            })
        })
        .collect();
    json!({
        "revision": report.revision,
        "already_compacted": report.already_compacted,
        "members": members,
    })
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
