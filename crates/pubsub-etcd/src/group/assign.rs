//! Partition assignment as a pure function of what every member sees in
//! etcd: the sorted member list and the owner keys. Each member computes
//! its own moves from the same inputs, so members agree without talking
//! to each other; the owner-key transactions in `member` make the moves
//! safe when two members race.

/// How many partitions the member at `index` of `members` sorted ids owns
/// when balanced: `partitions / members`, plus one for the first
/// `partitions % members` members. Quotas sum to `partitions` and differ
/// by at most one.
pub(crate) fn quota(partitions: u32, members: usize, index: usize) -> usize {
    if members == 0 {
        return 0;
    }
    let n = members as u64;
    let p = u64::from(partitions);
    (p / n + u64::from((index as u64) < p % n)) as usize
}

/// What one member does next to reach its quota.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Moves {
    /// Owned partitions to give up: the highest ones above the quota.
    pub(crate) release: Vec<u32>,
    /// Unowned partitions to try to claim, in order.
    pub(crate) claim: Vec<u32>,
}

/// The moves of the member at `index` of `members` sorted ids, which owns
/// `mine` (sorted ascending); `free` says whether nobody owns a partition.
///
/// A member above quota releases and claims nothing; below quota it claims
/// free partitions scanning from its own point of the ring, so members
/// joining together do not all race for the same partitions. Partitions
/// that stay within quota never move.
pub(crate) fn plan(
    partitions: u32,
    members: usize,
    index: usize,
    mine: &[u32],
    free: impl Fn(u32) -> bool,
) -> Moves {
    let quota = quota(partitions, members, index);
    if mine.len() >= quota {
        return Moves {
            release: mine[quota..].to_vec(),
            claim: Vec::new(),
        };
    }
    let start = (index as u64 * u64::from(partitions) / members as u64) as u32;
    let claim = (0..partitions)
        .map(|i| ((u64::from(start) + u64::from(i)) % u64::from(partitions)) as u32)
        .filter(|p| free(*p))
        .take(quota - mine.len())
        .collect();
    Moves {
        release: Vec::new(),
        claim,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Runs every member's `plan` in turn, as if each saw the previous
    /// member's writes, until nobody moves; returns the owner of each
    /// partition.
    fn settle(
        partitions: u32,
        members: &[u32],
        mut owners: BTreeMap<u32, u32>,
    ) -> BTreeMap<u32, u32> {
        owners.retain(|_, m| members.contains(m));
        for _round in 0..=members.len() * 2 + 2 {
            let mut moved = false;
            for (index, member) in members.iter().enumerate() {
                let mine: Vec<u32> = owners
                    .iter()
                    .filter(|(_, m)| *m == member)
                    .map(|(p, _)| *p)
                    .collect();
                let moves = plan(partitions, members.len(), index, &mine, |p| {
                    !owners.contains_key(&p)
                });
                for p in &moves.release {
                    owners.remove(p);
                }
                for p in moves.claim {
                    assert!(
                        owners.insert(p, *member).is_none(),
                        "claimed an owned partition"
                    );
                }
                moved |= !moves.release.is_empty();
            }
            let full = owners.len() == partitions as usize;
            if full && !moved {
                return owners;
            }
        }
        panic!(
            "no fixed point for {partitions} partitions, {} members",
            members.len()
        );
    }

    fn counts(owners: &BTreeMap<u32, u32>, members: &[u32]) -> Vec<usize> {
        members
            .iter()
            .map(|m| owners.values().filter(|o| *o == m).count())
            .collect()
    }

    fn assert_balanced(partitions: u32, members: &[u32], owners: &BTreeMap<u32, u32>) {
        let counts = counts(owners, members);
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 1, "{counts:?}");
        assert_eq!(counts.iter().sum::<usize>(), partitions as usize);
    }

    fn moved(before: &BTreeMap<u32, u32>, after: &BTreeMap<u32, u32>) -> usize {
        after
            .iter()
            .filter(|(p, m)| before.get(p) != Some(m))
            .count()
    }

    /// A small deterministic generator, so the property cases are
    /// reproducible without a dependency.
    fn cases() -> impl Iterator<Item = (u32, Vec<u32>)> {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..400).map(move |_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let partitions = (state % 97) as u32 + 1;
            let n = ((state >> 20) % 12) as usize + 1;
            let mut members: Vec<u32> = (0..n as u32)
                .map(|i| i * 7 + (state >> 40) as u32 % 5)
                .collect();
            members.sort_unstable();
            members.dedup();
            (partitions, members)
        })
    }

    #[test]
    fn quotas_sum_to_the_partitions_and_differ_by_at_most_one() {
        for partitions in 0..70 {
            for n in 1..20 {
                let q: Vec<usize> = (0..n).map(|i| quota(partitions, n, i)).collect();
                assert_eq!(q.iter().sum::<usize>(), partitions as usize);
                assert!(q.iter().max().unwrap() - q.iter().min().unwrap() <= 1);
            }
        }
        assert_eq!(quota(5, 0, 0), 0);
    }

    #[test]
    fn sixty_four_members_balance_within_one_on_1024_partitions() {
        let members: Vec<u32> = (0..64).collect();
        let owners = settle(1024, &members, BTreeMap::new());
        assert_balanced(1024, &members, &owners);
        assert!(counts(&owners, &members).iter().all(|c| *c == 16));
    }

    #[test]
    fn every_start_settles_balanced() {
        for (partitions, members) in cases() {
            let owners = settle(partitions, &members, BTreeMap::new());
            assert_balanced(partitions, &members, &owners);
        }
    }

    #[test]
    fn a_join_moves_only_what_the_new_member_takes() {
        for (partitions, members) in cases() {
            let before = settle(partitions, &members, BTreeMap::new());
            // Ids are 7 apart: one newcomer sorts first, one last, so the
            // others' indices shift or stay.
            for newcomer in [members[0] + 1, members[members.len() - 1] + 3] {
                let mut joined = members.clone();
                joined.push(newcomer);
                joined.sort_unstable();
                let after = settle(partitions, &joined, before.clone());
                assert_balanced(partitions, &joined, &after);
                let taken = after.values().filter(|m| **m == newcomer).count();
                assert_eq!(
                    moved(&before, &after),
                    taken,
                    "{partitions} partitions, {joined:?}"
                );
            }
        }
    }

    #[test]
    fn a_leave_moves_only_what_the_leaver_held() {
        for (partitions, members) in cases() {
            if members.len() < 2 {
                continue;
            }
            let before = settle(partitions, &members, BTreeMap::new());
            let leaver = members[members.len() / 2];
            let held = before.values().filter(|m| **m == leaver).count();
            let rest: Vec<u32> = members.iter().copied().filter(|m| *m != leaver).collect();
            let after = settle(partitions, &rest, before.clone());
            assert_balanced(partitions, &rest, &after);
            assert_eq!(
                moved(&before, &after),
                held,
                "{partitions} partitions, {members:?}"
            );
        }
    }

    #[test]
    fn the_same_view_gives_the_same_moves() {
        for (partitions, members) in cases() {
            let owners = settle(partitions, &members, BTreeMap::new());
            let mine: Vec<u32> = owners
                .iter()
                .filter(|(_, m)| **m == members[0])
                .map(|(p, _)| *p)
                .collect();
            let a = plan(partitions, members.len() + 1, 0, &mine, |p| p % 3 == 0);
            let b = plan(partitions, members.len() + 1, 0, &mine, |p| p % 3 == 0);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn an_over_quota_member_releases_its_highest_partitions() {
        let moves = plan(10, 5, 0, &[1, 4, 7, 9], |_| true);
        assert_eq!(
            moves,
            Moves {
                release: vec![7, 9],
                claim: vec![]
            }
        );
        let moves = plan(10, 2, 1, &[1], |p| p != 6);
        assert_eq!(
            moves,
            Moves {
                release: vec![],
                claim: vec![5, 7, 8, 9]
            }
        );
    }
}
