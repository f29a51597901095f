//! Leader balancing: which shards' leadership to hand where so that every
//! node that is up leads about as many groups as every other. A pure
//! function of what the nodes report, so that `rebalance --dry-run` shows
//! exactly what `--apply` does.

use std::collections::BTreeMap;

/// One group as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLeadership {
    /// The group (0 = metadata).
    pub group: u32,
    /// Its leader, if one answered.
    pub leader: Option<u64>,
    /// Its voters.
    pub voters: Vec<u64>,
}

/// One planned handover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderMove {
    /// The group.
    pub group: u32,
    /// Its leader now.
    pub from: u64,
    /// The voter that should lead it.
    pub to: u64,
    /// Why, for people.
    pub why: String,
}

/// Moves that bring every up node's leader count within one of every
/// other's where the voters allow it. Greedy: the node leading the most
/// hands one group to the least-loaded up voter of that group, while that
/// narrows the spread by at least two; each group moves at most once, and
/// only to an up voter. Groups without a known leader, or led by a node
/// that is not up, are left alone.
pub fn balance_leaders(groups: &[GroupLeadership], up: &[u64]) -> Vec<LeaderMove> {
    let mut counts: BTreeMap<u64, usize> = up.iter().map(|&n| (n, 0)).collect();
    let mut leader_of: BTreeMap<u32, u64> = BTreeMap::new();
    for g in groups {
        // A leader that did not answer is not asked to hand anything over.
        if let Some(leader) = g.leader.filter(|l| up.contains(l)) {
            *counts.entry(leader).or_default() += 1;
            leader_of.insert(g.group, leader);
        }
    }
    let mut moves = Vec::new();
    let mut moved: Vec<u32> = Vec::new();
    loop {
        // The most-loaded nodes first; the first with a group it can give.
        let mut by_load: Vec<(usize, u64)> = counts.iter().map(|(&n, &c)| (c, n)).collect();
        by_load.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut best: Option<(u32, u64, u64)> = None;
        'from: for &(from_count, from) in &by_load {
            for g in groups {
                if leader_of.get(&g.group) != Some(&from) || moved.contains(&g.group) {
                    continue;
                }
                let target = g
                    .voters
                    .iter()
                    .filter(|&&v| v != from && up.contains(&v))
                    .map(|&v| (counts.get(&v).copied().unwrap_or(0), v))
                    .min();
                if let Some((to_count, to)) = target
                    && to_count + 1 < from_count
                {
                    best = Some((g.group, from, to));
                    break 'from;
                }
            }
        }
        let Some((group, from, to)) = best else {
            return moves;
        };
        let from_count = counts[&from];
        let to_count = counts.get(&to).copied().unwrap_or(0);
        moves.push(LeaderMove {
            group,
            from,
            to,
            why: format!(
                "node {from} leads {from_count}, node {to} leads {to_count}: after the \
                 move {} and {}",
                from_count - 1,
                to_count + 1
            ),
        });
        *counts.entry(from).or_default() -= 1;
        *counts.entry(to).or_default() += 1;
        leader_of.insert(group, to);
        moved.push(group);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn counts_after(groups: &[GroupLeadership], moves: &[LeaderMove]) -> BTreeMap<u64, usize> {
        let mut leader: BTreeMap<u32, u64> = groups
            .iter()
            .filter_map(|g| g.leader.map(|l| (g.group, l)))
            .collect();
        for m in moves {
            assert_eq!(leader.get(&m.group), Some(&m.from), "{m:?}");
            leader.insert(m.group, m.to);
        }
        let mut counts = BTreeMap::new();
        for l in leader.values() {
            *counts.entry(*l).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn everything_on_one_node_spreads_over_three() {
        let groups: Vec<GroupLeadership> = (0..5)
            .map(|group| GroupLeadership {
                group,
                leader: Some(1),
                voters: vec![1, 2, 3],
            })
            .collect();
        let moves = balance_leaders(&groups, &[1, 2, 3]);
        let counts = counts_after(&groups, &moves);
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![2, 2, 1]);
        assert_eq!(moves.len(), 3);
    }

    #[test]
    fn a_balanced_cluster_needs_no_move() {
        let groups: Vec<GroupLeadership> = (0..6)
            .map(|group| GroupLeadership {
                group,
                leader: Some(1 + u64::from(group) % 3),
                voters: vec![1, 2, 3],
            })
            .collect();
        assert!(balance_leaders(&groups, &[1, 2, 3]).is_empty());
    }

    #[test]
    fn a_down_node_gets_nothing() {
        let groups: Vec<GroupLeadership> = (0..4)
            .map(|group| GroupLeadership {
                group,
                leader: Some(1),
                voters: vec![1, 2, 3],
            })
            .collect();
        let moves = balance_leaders(&groups, &[1, 2]);
        assert!(moves.iter().all(|m| m.to == 2), "{moves:?}");
        assert_eq!(moves.len(), 2);
    }

    fn groups_strategy() -> impl Strategy<Value = (Vec<GroupLeadership>, Vec<u64>)> {
        (2u64..7).prop_flat_map(|nodes| {
            let group = (
                proptest::sample::subsequence(
                    (1..=nodes).collect::<Vec<_>>(),
                    1..=usize::try_from(nodes.min(3)).unwrap(),
                ),
                any::<prop::sample::Index>(),
                any::<bool>(),
            );
            (
                proptest::collection::vec(group, 0..40),
                proptest::sample::subsequence(
                    (1..=nodes).collect::<Vec<_>>(),
                    1..=usize::try_from(nodes).unwrap(),
                ),
            )
                .prop_map(|(groups, up)| {
                    let groups = groups
                        .into_iter()
                        .enumerate()
                        .map(|(i, (voters, pick, known))| GroupLeadership {
                            group: u32::try_from(i).unwrap(),
                            leader: known.then(|| voters[pick.index(voters.len())]),
                            voters,
                        })
                        .collect();
                    (groups, up)
                })
        })
    }

    proptest! {
        /// Every move hands a group its planner-time leader owns to an up
        /// voter, once; the spread never grows; and where every up node is
        /// a voter of every group, the counts of up nodes end within one.
        #[test]
        fn moves_are_legal_and_never_widen_the_spread((groups, up) in groups_strategy()) {
            let moves = balance_leaders(&groups, &up);
            let mut seen = Vec::new();
            for m in &moves {
                let g = groups.iter().find(|g| g.group == m.group).unwrap();
                prop_assert!(g.voters.contains(&m.to) && up.contains(&m.to), "{m:?}");
                prop_assert!(!seen.contains(&m.group), "moved twice: {m:?}");
                seen.push(m.group);
            }
            let spread = |counts: &BTreeMap<u64, usize>| {
                let of = |n: &u64| counts.get(n).copied().unwrap_or(0);
                let max = up.iter().map(of).max().unwrap_or(0);
                let min = up.iter().map(of).min().unwrap_or(0);
                max - min
            };
            let before = counts_after(&groups, &[]);
            let after = counts_after(&groups, &moves);
            prop_assert!(spread(&after) <= spread(&before));
            let everywhere = groups.iter().all(|g| up.iter().all(|n| g.voters.contains(n)));
            let led_by_up = groups.iter().all(|g| g.leader.is_some_and(|l| up.contains(&l)));
            if everywhere && led_by_up {
                prop_assert!(spread(&after) <= 1, "{after:?} from {before:?}: {moves:?}");
            }
        }
    }
}
