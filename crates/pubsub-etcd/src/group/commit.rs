//! Every way a group's committed offset is written, and its value format:
//! the fenced commit of a member ([`Committer`], used for explicit commits
//! and for the [`AutoCommit`] policies alike) and the unowned commit of the
//! admin calls. The committed offset is the next offset to read, stored as a
//! decimal number.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use tokio::time::Instant;

use super::start::check_partition;
use super::state::{Claim, MemberState};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::keys::prefix_end;
use crate::record::Message;
use crate::telemetry;
use crate::topic::validate_group_name;

/// Partitions per fenced commit transaction: two compares and one put each,
/// within etcd's 128 operations per transaction.
const FENCED_PER_TXN: usize = 40;
/// Partitions per unowned commit transaction: one put each, beside the two
/// compares of the whole transaction.
const UNOWNED_PER_TXN: usize = 100;

/// When a consumer commits on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AutoCommit {
    /// Only explicit commits; a revoked or closed partition keeps its last
    /// explicit commit.
    Disabled,
    /// Every interval, and when a partition is revoked or the consumer
    /// closes, commit everything the application has taken.
    Interval(Duration),
    /// Commit each message when the application asks for the next one (it
    /// has then handled the previous one): at-least-once with at most one
    /// message redelivered, at the cost of one etcd write per message.
    EveryMessage,
}

impl Default for AutoCommit {
    fn default() -> Self {
        AutoCommit::Interval(Duration::from_secs(5))
    }
}

/// The stored form of a committed offset.
fn format_offset(offset: u64) -> String {
    offset.to_string()
}

/// Parses a committed offset value (a decimal number).
pub(crate) fn parse_offset(key: &[u8], value: &[u8]) -> Result<u64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: "committed offset is not a decimal number".into(),
        })
}

/// Commits for one member, from its consumer, its member task or any task
/// the application hands it to (a subscription), always fenced.
#[derive(Debug, Clone)]
pub(crate) struct Committer {
    /// The member's own connection.
    client: Client,
    topic: Arc<str>,
    group: Arc<str>,
    member_id: Arc<str>,
    state: Arc<MemberState>,
}

impl Committer {
    pub(crate) fn new(
        client: Client,
        topic: Arc<str>,
        group: &str,
        member_id: &str,
        state: Arc<MemberState>,
    ) -> Committer {
        Committer {
            client,
            topic,
            group: group.into(),
            member_id: member_id.into(),
            state,
        }
    }

    pub(crate) async fn commit(&self, message: &Message) -> Result<()> {
        self.commit_at(message.partition, message.offset).await
    }

    /// Commits past the message at `offset`, which must have been delivered
    /// under the current claim: between the claim's start and the position.
    pub(crate) async fn commit_at(&self, partition: u32, offset: u64) -> Result<()> {
        if !self.state.delivered(partition, offset) {
            return Err(Error::NotOwner {
                topic: self.topic.to_string(),
                partition,
            });
        }
        self.commit_offsets(&BTreeMap::from([(partition, offset + 1)]))
            .await
    }

    /// Commits what was delivered and not committed yet, on `only` these
    /// partitions or on every owned one.
    pub(crate) async fn commit_delivered(&self, only: Option<&[u32]>) -> Result<()> {
        let positions = self.state.uncommitted(only);
        if positions.is_empty() {
            return Ok(());
        }
        self.commit_offsets(&positions).await
    }

    /// The fenced commit: one transaction per chunk of partitions, each
    /// guarded by the owner key still holding this member's id at the create
    /// revision of this member's claim.
    #[tracing::instrument(level = "debug", name = "commit", skip_all, fields(partitions = offsets.len()))]
    pub(crate) async fn commit_offsets(&self, offsets: &BTreeMap<u32, u64>) -> Result<()> {
        let (client, topic, group) = (&self.client, &*self.topic, &*self.group);
        let claims = self.state.commit_claims(topic, offsets)?;
        for chunk in claims.chunks(FENCED_PER_TXN) {
            let mut compares = Vec::with_capacity(chunk.len() * 2);
            let mut puts = Vec::with_capacity(chunk.len());
            for (partition, offset, claim) in chunk {
                let owner = client.keys.owner(topic, group, *partition);
                compares.push(Compare::value(
                    owner.clone(),
                    CompareOp::Equal,
                    &*self.member_id,
                ));
                compares.push(Compare::create_revision(
                    owner,
                    CompareOp::Equal,
                    claim.owner_revision(),
                ));
                puts.push(TxnOp::put(
                    client.keys.offset(topic, group, *partition),
                    format_offset(*offset),
                    None,
                ));
            }
            let txn = Txn::new().when(compares).and_then(puts);
            let started = Instant::now();
            let response = client
                .timed("commit offsets", client.kv.clone().txn(txn))
                .await?;
            telemetry::committed(topic, group, started.elapsed());
            if !response.succeeded() {
                return Err(Error::NotOwner {
                    topic: topic.to_string(),
                    partition: self.lost_partition(chunk).await,
                });
            }
            self.state.committed(
                chunk
                    .iter()
                    .map(|(partition, offset, _)| (*partition, *offset)),
            );
        }
        Ok(())
    }

    /// The member's own connection, which its commits use.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// The topic the member reads.
    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    /// The claims a transaction's input `offsets` are committed under, or
    /// why not: as for [`Committer::commit_offsets`], and
    /// [`Error::InputCommitted`] below what the group committed already.
    pub(crate) fn input_claims(
        &self,
        offsets: &BTreeMap<u32, u64>,
    ) -> Result<Vec<(u32, u64, Claim)>> {
        let claims = self.state.commit_claims(&self.topic, offsets)?;
        for (partition, offset, _) in &claims {
            if let Some(committed) = self.state.committed_offset(*partition) {
                if *offset < committed {
                    return Err(Error::InputCommitted {
                        topic: self.topic.to_string(),
                        partition: *partition,
                        offset: *offset,
                        committed,
                    });
                }
            }
        }
        Ok(claims)
    }

    /// The compares fencing a write to `partition` to `claim`.
    pub(crate) fn fence(&self, partition: u32, claim: &Claim) -> [Compare; 2] {
        let owner = self.client.keys.owner(&self.topic, &self.group, partition);
        [
            Compare::value(owner.clone(), CompareOp::Equal, &*self.member_id),
            Compare::create_revision(owner, CompareOp::Equal, claim.owner_revision()),
        ]
    }

    /// The put of committed offset `offset` on `partition`.
    pub(crate) fn offset_put(&self, partition: u32, offset: u64) -> TxnOp {
        TxnOp::put(
            self.client.keys.offset(&self.topic, &self.group, partition),
            format_offset(offset),
            None,
        )
    }

    /// The read of `partition`'s owner key, for [`Committer::holds`].
    pub(crate) fn owner_get(&self, partition: u32) -> TxnOp {
        TxnOp::get(
            self.client.keys.owner(&self.topic, &self.group, partition),
            None,
        )
    }

    /// Whether an owner key as read still holds `claim`.
    pub(crate) fn holds(&self, owner: Option<&etcd_client::KeyValue>, claim: &Claim) -> bool {
        owner.is_some_and(|kv| {
            kv.value() == self.member_id.as_bytes()
                && kv.create_revision() == claim.owner_revision()
        })
    }

    /// These (partition, offset) commits landed by other means than
    /// [`Committer::commit_offsets`] (a transaction).
    pub(crate) fn recorded(&self, commits: impl IntoIterator<Item = (u32, u64)>) {
        self.state.committed(commits);
    }

    /// Which partition of a refused commit chunk is no longer this member's
    /// (the first of the chunk if the owners cannot be read).
    async fn lost_partition(&self, chunk: &[(u32, u64, Claim)]) -> u32 {
        let client = &self.client;
        let gets: Vec<TxnOp> = chunk
            .iter()
            .map(|(p, _, _)| TxnOp::get(client.keys.owner(&self.topic, &self.group, *p), None))
            .collect();
        let response = client
            .timed(
                "read owners",
                client.kv.clone().txn(Txn::new().and_then(gets)),
            )
            .await;
        let Ok(response) = response else {
            return chunk[0].0;
        };
        for ((partition, _, claim), op) in chunk.iter().zip(response.op_responses()) {
            let ours = match op {
                TxnOpResponse::Get(get) => get.kvs().first().is_some_and(|kv| {
                    kv.value() == self.member_id.as_bytes()
                        && kv.create_revision() == claim.owner_revision()
                }),
                _ => false,
            };
            if !ours {
                return *partition;
            }
        }
        chunk[0].0
    }
}

impl Client {
    /// Sets a group's committed offsets without being a member: for tools
    /// and manual assignment. Refused with [`Error::GroupActive`] while any
    /// member owns a partition of the topic, since its commits would race
    /// with these.
    ///
    /// # Errors
    ///
    /// [`Error::GroupActive`] as above; [`Error::InvalidGroupName`];
    /// [`Error::TopicNotFound`]; [`Error::PartitionOutOfRange`];
    /// [`Error::Timeout`] or [`Error::Etcd`]. Partitions go 100 to a
    /// transaction, so a failed commit of more may have landed for the
    /// first ones.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves each transaction either done or not done.
    pub async fn commit_offsets_unowned(
        &self,
        topic: &str,
        group: &str,
        offsets: &BTreeMap<u32, u64>,
    ) -> Result<()> {
        validate_group_name(group)?;
        let info = self.topic(topic).await?;
        let owners = self.keys.owners_prefix(topic, group);
        self.remove_unleased(&owners).await?;
        // A range compare holds when no key in the range exists: no owners.
        let compares = [
            Compare::create_revision(self.keys.topic(topic), CompareOp::Equal, info.incarnation),
            Compare::create_revision(owners.clone(), CompareOp::Equal, 0)
                .with_range(prefix_end(&owners)),
        ];
        let mut ops = Vec::with_capacity(offsets.len());
        for (&partition, &offset) in offsets {
            check_partition(&info, partition)?;
            ops.push(TxnOp::put(
                self.keys.offset(topic, group, partition),
                format_offset(offset),
                None,
            ));
        }
        for chunk in ops.chunks(UNOWNED_PER_TXN) {
            let txn = Txn::new().when(compares.clone()).and_then(chunk.to_vec());
            let response = self
                .timed("commit offsets", self.kv.clone().txn(txn))
                .await?;
            if !response.succeeded() {
                return Err(Error::GroupActive {
                    group: group.to_string(),
                    topic: topic.to_string(),
                });
            }
        }
        Ok(())
    }
}
