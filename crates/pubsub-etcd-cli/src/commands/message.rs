//! `message delete`.

use pubsub_etcd::Client;
use serde_json::json;

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
            let deleted = client.delete_messages(&topic, partition, &offsets).await?;
            let requested = offsets.len();
            match format.format {
                Format::Json => {
                    output::print_json(&json!({ "deleted": deleted, "requested": requested }))
                }
                Format::Table => output::print_text(&format!(
                    "deleted {deleted} of {requested} messages from partition {partition} \
                     of topic {topic:?}\n"
                )),
            }
        }
    }
}
