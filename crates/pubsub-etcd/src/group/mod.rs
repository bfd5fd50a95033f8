//! The consumer group, apart from the application-facing [`crate::Consumer`]:
//!
//! - `state`: what a member's consumer front and background task share
//!   (claims, lease validity, delivered and committed positions) and the
//!   rebalance [`Event`]s;
//! - `member`: the background task (lease, membership watch, claims and
//!   releases, one reader per owned partition);
//! - `assign`: the balancing arithmetic, a pure function;
//! - `commit`: every write of a committed offset (fenced, auto, unowned)
//!   and its value format;
//! - `start`: where reading starts ([`StartOffset`]);
//! - `admin`: group state not tied to a live member (list, lag, reset,
//!   delete).
//!
//! Dependencies run one way: `member` uses `state`, `assign`, `commit` and
//! `start`; `commit` uses `state`; nothing here uses `crate::consumer`.

mod admin;
pub(crate) mod assign;
mod commit;
mod member;
mod start;
mod state;

pub use admin::PartitionLag;
pub use commit::AutoCommit;
pub(crate) use commit::Committer;
pub(crate) use member::{Control, Member, MemberConfig};
pub(crate) use start::check_partition;
pub use start::StartOffset;
pub use state::Event;
pub(crate) use state::{Ack, Claim, MemberState, Notice};
