//! etcd space maintenance: compacting etcd's history, defragmenting its
//! members, and disarming the NOSPACE alarm, so an operator (or the CLI's
//! `admin compact`) can keep etcd inside its backend quota and recover once
//! it was exceeded.
//!
//! Deleting keys frees nothing by itself: etcd keeps every revision until
//! its history is compacted, and the database file shrinks only when each
//! member is defragmented. Once the quota was exceeded, etcd raises a NOSPACE
//! alarm and refuses writes until the alarm is disarmed, even after space
//! was freed; reads, deletes, compaction and defragmentation still work.
//!
//! Recovery from NOSPACE, in order:
//! 1. delete data: [`Client::truncate_partition`], [`Client::delete_topic`],
//!    [`Client::enforce_retention`] with tighter limits (all only delete
//!    keys, which etcd allows under the alarm);
//! 2. [`Client::compact_history`] with `defrag = true`;
//! 3. [`Client::disarm_nospace`], which disarms each alarm with its member
//!    id (etcd answers OK and does nothing when no member is given).

use std::time::Duration;

use etcd_client::{AlarmAction, AlarmOptions, AlarmType, CompactionOptions};
use serde::Serialize;

use crate::client::Client;
use crate::compactor::{self, CompactionRecord};
use crate::error::{Error, Result};
use crate::keys::Keys;

/// What [`Client::compact_history`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CompactReport {
    /// The revision etcd's history was compacted to (the current revision
    /// when the operation started).
    pub revision: i64,
    /// The history was already compacted at or past `revision` (nothing to do).
    pub already_compacted: bool,
    /// Each member's database size around the operation.
    pub members: Vec<MemberSpace>,
}

/// One etcd member's database size before and after a compaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MemberSpace {
    pub member_id: u64,
    pub name: String,
    /// The client URL used to reach the member.
    pub endpoint: String,
    /// Size of the database file in bytes (what the quota is checked against).
    pub db_size_before: Option<i64>,
    pub db_size_after: Option<i64>,
    /// Bytes of the file actually in use after the operation.
    pub db_size_in_use_after: Option<i64>,
    /// Whether the member was defragmented.
    pub defragmented: bool,
    /// Why the member could not be reached or defragmented, if so.
    pub error: Option<String>,
}

/// The state of etcd's history and space, for [`Client::history_status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HistoryStatus {
    /// etcd's current revision.
    pub revision: i64,
    /// The oldest revision etcd still holds: 1 when it was never compacted.
    /// `revision - oldest_revision` is the span of history kept.
    pub oldest_revision: i64,
    /// The last automatic compaction cycle of any client, if any ran, or
    /// `None` also when this client may not read the coordinating key.
    pub last_cycle: Option<CompactionRecord>,
    /// Why the last cycle could not be read, if so (refused, unreadable).
    pub last_cycle_error: Option<String>,
    /// Whether this client takes part in automatic compaction.
    pub auto_compacting: bool,
    /// Each member's database size against the part of it in use.
    pub members: Vec<MemberStatus>,
}

/// One etcd member's database size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MemberStatus {
    pub member_id: u64,
    pub name: String,
    pub endpoint: String,
    /// Size of the database file in bytes (what the quota is checked against).
    pub db_size: Option<i64>,
    /// Bytes of the file in use; the rest is free space that only
    /// defragmentation gives back.
    pub db_size_in_use: Option<i64>,
    /// Whether this member is the Raft leader, as it says itself.
    pub leader: Option<bool>,
    /// The member's Raft index and term: members far behind the others are
    /// not keeping up.
    pub raft_index: Option<u64>,
    pub raft_term: Option<u64>,
    /// The etcd version the member runs.
    pub version: Option<String>,
    /// Why the member could not be asked, if so.
    pub error: Option<String>,
}

/// An alarm raised by an etcd member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Alarm {
    pub member_id: u64,
    pub kind: AlarmKind,
}

/// The kinds of etcd alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub enum AlarmKind {
    /// The backend quota is exhausted: writes fail until disarmed.
    NoSpace,
    /// Data corruption detected.
    Corrupt,
}

/// How long connecting to one member for maintenance may take.
const MEMBER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one member's defragmentation may take (it blocks the member and
/// takes time proportional to the database size).
const DEFRAG_TIMEOUT: Duration = Duration::from_secs(120);

impl Client {
    /// Compacts etcd's history up to the current revision and, with
    /// `defrag`, defragments every member (one after the other) so the
    /// database file shrinks. Compaction affects every user of the etcd
    /// cluster, not just this namespace.
    ///
    /// Compacting to the current revision is safe for this library: every
    /// live message, head, offset and group key is in the current key-value
    /// state, never only in history. Readers read stored batches and only
    /// watch for new ones; a watch whose start revision was compacted is
    /// cancelled by etcd and the reader falls back to range reads from its
    /// position (likewise group members re-read their state), so compaction
    /// loses nothing and stalls nothing. What compaction removes is only the
    /// superseded versions of keys and deleted keys, i.e. the space that
    /// deletion, truncation and retention freed.
    ///
    /// Defragmentation blocks the member it runs on for a moment (reads and
    /// writes to it wait); prefer running it when load is low. Each member is
    /// reached alone through its advertised client URL, with this client's
    /// TLS settings and credentials; a member that cannot be reached reports
    /// an `error` and the others are still defragmented.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] or [`Error::Etcd`] when etcd does not answer in time or
    /// refuses while the members are listed or the history is compacted; a member
    /// that cannot be reached or defragmented is reported in its
    /// [`MemberSpace::error`] instead.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call may have compacted the history and
    /// defragmented some members. Nothing is lost; calling it again finishes
    /// the work.
    #[tracing::instrument(level = "debug", skip(self))]
    pub async fn compact_history(&self, defrag: bool) -> Result<CompactReport> {
        let members = self.maintenance_members().await?;
        let mut spaces = Vec::with_capacity(members.len());
        for (space, etcd) in &members {
            let mut space = space.clone();
            if let Some(etcd) = etcd {
                match self.timed("status", etcd.clone().status()).await {
                    Ok(status) => space.db_size_before = Some(status.db_size()),
                    Err(e) => space.error = Some(e.to_string()),
                }
            }
            spaces.push(space);
        }
        // The current revision, from the header of a cheap read.
        let response = self
            .timed(
                "read revision",
                self.kv.clone().get(
                    self.keys.topics_prefix(),
                    Some(etcd_client::GetOptions::new().with_count_only()),
                ),
            )
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut already_compacted = false;
        // Physical: wait until the compaction is applied to the backend, so
        // a defragment right after really reclaims the space.
        let compaction = self
            .timed(
                "compact",
                self.kv
                    .clone()
                    .compact(revision, Some(CompactionOptions::new().with_physical())),
            )
            .await;
        match compaction {
            Ok(_) => {}
            Err(Error::Etcd { source, .. })
                if source
                    .to_string()
                    .contains("required revision has been compacted") =>
            {
                already_compacted = true;
            }
            Err(e) => return Err(e),
        }
        for ((_, etcd), space) in members.iter().zip(spaces.iter_mut()) {
            let Some(etcd) = etcd else { continue };
            if defrag {
                match tokio::time::timeout(DEFRAG_TIMEOUT, etcd.clone().defragment()).await {
                    Ok(Ok(_)) => space.defragmented = true,
                    Ok(Err(e)) => space.error = Some(format!("defragment failed: {e}")),
                    Err(_) => {
                        space.error = Some(format!("defragment took over {DEFRAG_TIMEOUT:?}"))
                    }
                }
            }
            if let Ok(status) = self.timed("status", etcd.clone().status()).await {
                space.db_size_after = Some(status.db_size());
                space.db_size_in_use_after = Some(status.raft_used_db_size());
            }
        }
        Ok(CompactReport {
            revision,
            already_compacted,
            members: spaces,
        })
    }

    /// The span of history etcd keeps, the last automatic compaction, and
    /// each member's database size against its in-use size. Read-only.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] or [`Error::Etcd`] when etcd does not answer in time or
    /// refuses while the revisions or the members are read; a member that cannot be
    /// asked is reported in its [`MemberStatus::error`], and an unreadable record
    /// of the last cycle in `last_cycle_error`.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    pub async fn history_status(&self) -> Result<HistoryStatus> {
        let (last_cycle, last_cycle_error, revision) = match self
            .timed(
                "read compaction key",
                self.kv.clone().get(Keys::COMPACTION, None),
            )
            .await
        {
            Ok(response) => {
                let revision = response.header().map_or(0, |h| h.revision());
                match response
                    .kvs()
                    .first()
                    .map(|kv| compactor::parse_record(kv.value()))
                {
                    None => (None, None, revision),
                    Some(Ok(record)) => (Some(record), None, revision),
                    Some(Err(e)) => (None, Some(e.to_string()), revision),
                }
            }
            Err(e) => (None, Some(e.to_string()), self.current_revision().await?),
        };
        let oldest_revision = self.oldest_revision(revision).await?;
        let mut members = Vec::new();
        for (space, etcd) in self.maintenance_members().await? {
            let mut member = MemberStatus {
                member_id: space.member_id,
                name: space.name,
                endpoint: space.endpoint,
                db_size: None,
                db_size_in_use: None,
                leader: None,
                raft_index: None,
                raft_term: None,
                version: None,
                error: space.error,
            };
            if let Some(mut etcd) = etcd {
                match self.timed("status", etcd.status()).await {
                    Ok(status) => {
                        member.db_size = Some(status.db_size());
                        member.db_size_in_use = Some(status.raft_used_db_size());
                        member.leader = Some(status.leader() == space.member_id);
                        member.raft_index = Some(status.raft_index());
                        member.raft_term = Some(status.raft_term());
                        member.version = Some(status.version().to_string());
                    }
                    Err(e) => member.error = Some(e.to_string()),
                }
            }
            members.push(member);
        }
        Ok(HistoryStatus {
            revision,
            oldest_revision,
            last_cycle,
            last_cycle_error,
            auto_compacting: self.auto_compacting(),
            members,
        })
    }

    async fn current_revision(&self) -> Result<i64> {
        let response = self
            .read(
                "read revision",
                self.keys.topics_prefix(),
                Some(etcd_client::GetOptions::new().with_count_only()),
            )
            .await?;
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    /// The oldest revision at or below `current` that etcd can still read.
    /// etcd does not report its compaction revision, so this searches for
    /// it with single-key reads at past revisions (about 30 of them), on a
    /// key of this namespace so that RBAC allows them.
    async fn oldest_revision(&self, current: i64) -> Result<i64> {
        let key = self.keys.topics_prefix();
        let (mut low, mut high) = (1, current.max(1));
        while low < high {
            let middle = low + (high - low) / 2;
            let options = etcd_client::GetOptions::new().with_revision(middle);
            match self
                .read("read past revision", key.clone(), Some(options))
                .await
            {
                Ok(_) => high = middle,
                Err(Error::Etcd { detail, .. }) if detail.contains("has been compacted") => {
                    low = middle + 1
                }
                Err(e) => return Err(e),
            }
        }
        Ok(low)
    }

    /// Every alarm raised in the etcd cluster.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] or [`Error::Etcd`] when etcd does not answer in time or refuses.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    pub async fn alarms(&self) -> Result<Vec<Alarm>> {
        let response = self
            .timed(
                "list alarms",
                self.etcd
                    .clone()
                    .alarm(AlarmAction::Get, AlarmType::None, None),
            )
            .await?;
        Ok(response
            .alarms()
            .iter()
            .filter_map(|a| {
                let kind = match a.alarm() {
                    AlarmType::Nospace => AlarmKind::NoSpace,
                    AlarmType::Corrupt => AlarmKind::Corrupt,
                    AlarmType::None => return None,
                };
                Some(Alarm {
                    member_id: a.member_id(),
                    kind,
                })
            })
            .collect())
    }

    /// Disarms every NOSPACE alarm, each with the id of the member that
    /// raised it (etcd ignores a disarm without a member id), and returns
    /// those member ids. Free space first ([`Client::compact_history`] with
    /// defragmentation): a member still over its quota raises the alarm again
    /// at the next write.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] or [`Error::Etcd`] when etcd does not answer in time or
    /// refuses; the alarms disarmed before the failure stay disarmed.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call may have disarmed some alarms and not
    /// others; calling it again disarms the rest.
    pub async fn disarm_nospace(&self) -> Result<Vec<u64>> {
        let mut disarmed = Vec::new();
        for alarm in self.alarms().await? {
            if alarm.kind != AlarmKind::NoSpace {
                continue;
            }
            let mut options = AlarmOptions::new();
            options.with_member(alarm.member_id);
            self.timed(
                "disarm alarm",
                self.etcd
                    .clone()
                    .alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(options)),
            )
            .await?;
            disarmed.push(alarm.member_id);
        }
        Ok(disarmed)
    }

    /// Every member with a client to reach it alone (`None` when that
    /// failed), connected with this client's TLS settings and credentials.
    /// A single-member cluster is reached through this client's own
    /// connection.
    async fn maintenance_members(&self) -> Result<Vec<(MemberSpace, Option<etcd_client::Client>)>> {
        let list = self
            .timed("list members", self.etcd.clone().member_list())
            .await?;
        let single = list.members().len() == 1;
        let mut members = Vec::new();
        for member in list.members() {
            let endpoint = member.client_urls().first().cloned().unwrap_or_default();
            let mut space = MemberSpace {
                member_id: member.id(),
                name: member.name().to_string(),
                endpoint: endpoint.clone(),
                db_size_before: None,
                db_size_after: None,
                db_size_in_use_after: None,
                defragmented: false,
                error: None,
            };
            let etcd = if single {
                Some(self.etcd.clone())
            } else if endpoint.is_empty() {
                space.error = Some("member has no client URL (not started?)".into());
                None
            } else {
                // The client's own options: the same TLS and credentials.
                let options = self
                    .connect_options
                    .clone()
                    .with_connect_timeout(MEMBER_CONNECT_TIMEOUT)
                    .with_timeout(self.request_timeout.max(DEFRAG_TIMEOUT));
                match tokio::time::timeout(
                    MEMBER_CONNECT_TIMEOUT,
                    etcd_client::Client::connect([endpoint.as_str()], Some(options)),
                )
                .await
                {
                    Ok(Ok(etcd)) => Some(etcd),
                    Ok(Err(e)) => {
                        space.error = Some(format!("cannot connect: {e}"));
                        None
                    }
                    Err(_) => {
                        space.error = Some("cannot connect: timed out".into());
                        None
                    }
                }
            };
            members.push((space, etcd));
        }
        Ok(members)
    }
}
