//! `message delete`.

use pubsub_etcd::Client;
use serde::Serialize;

use crate::cli::{Format, MessageCommand};
use crate::output;

pub async fn run(client: &Client, command: MessageCommand) -> anyhow::Result<()> {
    match command {
        MessageCommand::Delete {
            topic,
            partition,
            mut offsets,
            format,
        } => {
            // The library ignores duplicates; so does the count requested.
            offsets.sort_unstable();
            offsets.dedup();
            let mut stored = Vec::with_capacity(offsets.len());
            let mut missing = Vec::new();
            for &offset in &offsets {
                let page = client.fetch(&topic, partition, offset, 1).await?;
                if page.messages.first().is_some_and(|m| m.offset == offset) {
                    stored.push(offset);
                } else {
                    missing.push(offset);
                }
            }
            let deleted = client.delete_messages(&topic, partition, &stored).await?;
            let requested = offsets.len();
            let result = match format.format {
                Format::Json => output::print_json(&Deleted {
                    deleted,
                    requested,
                    not_found: &missing,
                }),
                Format::Table => output::print_text(&format!(
                    "deleted {deleted} of {requested} messages from partition {partition} \
                     of topic {topic:?}\n"
                )),
            };
            result?;
            if !missing.is_empty() {
                let listed: Vec<String> = missing.iter().map(u64::to_string).collect();
                anyhow::bail!(
                    "no message stored at offset {} of partition {partition} of topic {topic:?}",
                    listed.join(", ")
                );
            }
            Ok(())
        }
    }
}

/// `message delete` in JSON.
#[derive(Serialize)]
struct Deleted<'a> {
    deleted: u64,
    requested: usize,
    not_found: &'a [u64],
}
