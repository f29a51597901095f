//! Where data lives: shards as arcs of the 64-bit key-hash ring, replicas by
//! rendezvous hashing of shard over nodes.
//!
//! Shard `s` (1-based) owns hashes `[(s-1)·2⁶⁴/S, s·2⁶⁴/S)`; since stored keys
//! start with the big-endian hash, a shard is one contiguous key range. The
//! replicas of a group are the `rf` nodes with the highest
//! `xxh3(group, node)` score: deterministic on every node, and adding a node
//! moves only the groups it now wins (about 1/N of them).

use std::collections::BTreeMap;

use quiver_raft::{GroupId, METADATA_GROUP, NodeId};
use xxhash_rust::xxh3::xxh3_64;

use crate::config::{ClusterConfig, NodeAddr};

/// The static cluster map.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// Node id to peer address (where Raft traffic goes).
    pub nodes: BTreeMap<NodeId, String>,
    /// Node id to client address (shown in status).
    pub client_addrs: BTreeMap<NodeId, String>,
    /// Number of shards (groups `1..=shard_count`).
    pub shard_count: u32,
    /// Replicas of every shard.
    pub replicas: BTreeMap<GroupId, Vec<NodeId>>,
    /// Voters of the metadata group.
    pub metadata_voters: Vec<NodeId>,
    /// Every other node follows the metadata group as a learner.
    pub metadata_learners: Vec<NodeId>,
}

impl Placement {
    /// Computes the map from a cluster description (this node's client and
    /// peer addresses are used when the description is empty: a one-node
    /// cluster). A node without a usable peer address is refused by config
    /// validation; here it maps to its client address.
    pub fn new(config: &ClusterConfig, self_addr: &str, self_peer_addr: &str) -> Placement {
        let (nodes, client_addrs) = if config.nodes.is_empty() {
            (
                BTreeMap::from([(config.node_id, self_peer_addr.to_owned())]),
                BTreeMap::from([(config.node_id, self_addr.to_owned())]),
            )
        } else {
            (
                config
                    .nodes
                    .iter()
                    .map(|node: &NodeAddr| {
                        (
                            node.id,
                            node.peer_addr().unwrap_or_else(|| node.addr.clone()),
                        )
                    })
                    .collect(),
                config
                    .nodes
                    .iter()
                    .map(|node| (node.id, node.addr.clone()))
                    .collect(),
            )
        };
        let ids: Vec<NodeId> = nodes.keys().copied().collect();
        let rf = (config.replication_factor as usize).min(ids.len());
        let replicas = (1..=config.shard_count)
            .map(|shard| (shard, rendezvous(shard, &ids, rf)))
            .collect();
        let voters = rendezvous(
            METADATA_GROUP,
            &ids,
            (config.metadata_voters as usize).min(ids.len()),
        );
        let learners = ids
            .iter()
            .copied()
            .filter(|id| !voters.contains(id))
            .collect();
        Placement {
            nodes,
            client_addrs,
            shard_count: config.shard_count,
            replicas,
            metadata_voters: voters,
            metadata_learners: learners,
        }
    }

    /// The shard owning a key hash.
    pub fn shard_of_hash(&self, hash: u64) -> GroupId {
        let shard = (u128::from(hash) * u128::from(self.shard_count)) >> 64;
        // shard < shard_count <= u32::MAX, so the cast is exact.
        shard as GroupId + 1
    }

    /// The shard owning an entity key.
    pub fn shard_of_key(&self, entity_key: &str) -> GroupId {
        self.shard_of_hash(quiver_engine::keys::entity_hash(entity_key.as_bytes()))
    }

    /// Splits items by the shard of their entity key, keeping their order
    /// within a shard.
    pub fn by_shard<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        entity_key: impl Fn(&T) -> &str,
    ) -> BTreeMap<GroupId, Vec<T>> {
        let mut by_shard = BTreeMap::<GroupId, Vec<T>>::new();
        for item in items {
            by_shard
                .entry(self.shard_of_key(entity_key(&item)))
                .or_default()
                .push(item);
        }
        by_shard
    }

    /// The nodes holding a replica (voter or learner) of a group.
    pub fn members(&self, group: GroupId) -> Vec<NodeId> {
        if group == METADATA_GROUP {
            let mut all = self.metadata_voters.clone();
            all.extend(&self.metadata_learners);
            all
        } else {
            self.replicas.get(&group).cloned().unwrap_or_default()
        }
    }

    /// The voters of a group.
    pub fn voters(&self, group: GroupId) -> Vec<NodeId> {
        if group == METADATA_GROUP {
            self.metadata_voters.clone()
        } else {
            self.members(group)
        }
    }

    /// Groups with a replica on `node`, metadata group first.
    pub fn groups_of(&self, node: NodeId) -> Vec<GroupId> {
        let mut groups = vec![METADATA_GROUP];
        groups.extend(
            self.replicas
                .iter()
                .filter(|(_, replicas)| replicas.contains(&node))
                .map(|(group, _)| *group),
        );
        groups
    }
}

/// The `count` nodes with the highest score for `group`, best first.
fn rendezvous(group: GroupId, nodes: &[NodeId], count: usize) -> Vec<NodeId> {
    let mut scored: Vec<(u64, NodeId)> = nodes
        .iter()
        .map(|&node| {
            let mut key = [0u8; 12];
            key[..4].copy_from_slice(&group.to_be_bytes());
            key[4..].copy_from_slice(&node.to_be_bytes());
            (xxh3_64(&key), node)
        })
        .collect();
    scored.sort_by(|a, b| b.cmp(a));
    scored
        .into_iter()
        .take(count)
        .map(|(_, node)| node)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(nodes: u64, shards: u32, rf: u32) -> ClusterConfig {
        ClusterConfig {
            nodes: (1..=nodes)
                .map(|id| NodeAddr {
                    id,
                    addr: format!("127.0.0.1:{}", 7000 + id),
                    peer_addr: None,
                })
                .collect(),
            shard_count: shards,
            replication_factor: rf,
            ..ClusterConfig::default()
        }
    }

    #[test]
    fn shards_cover_the_ring_in_order() {
        let placement = Placement::new(&config(3, 16, 3), "", "");
        assert_eq!(placement.shard_of_hash(0), 1);
        assert_eq!(placement.shard_of_hash(u64::MAX), 16);
        assert_eq!(placement.shard_of_hash(1 << 60), 2);
        let mut last = 1;
        for step in 0..1000u64 {
            let shard = placement.shard_of_hash(step.wrapping_mul(u64::MAX / 1000));
            assert!(shard >= last && shard <= 16);
            last = shard;
        }
    }

    #[test]
    fn replicas_are_distinct_deterministic_and_balanced() {
        let placement = Placement::new(&config(5, 64, 3), "", "");
        let again = Placement::new(&config(5, 64, 3), "", "");
        assert_eq!(placement, again);
        let mut per_node = BTreeMap::<NodeId, usize>::new();
        for replicas in placement.replicas.values() {
            let mut sorted = replicas.clone();
            sorted.dedup();
            assert_eq!(sorted.len(), 3);
            for node in replicas {
                *per_node.entry(*node).or_default() += 1;
            }
        }
        // 192 replicas over 5 nodes: none starved, none hoarding.
        assert!(
            per_node.values().all(|&n| (20..=60).contains(&n)),
            "{per_node:?}"
        );
        assert_eq!(placement.metadata_voters.len(), 3);
        assert_eq!(placement.metadata_learners.len(), 2);
    }

    #[test]
    fn adding_a_node_moves_few_replicas() {
        let before = Placement::new(&config(5, 128, 3), "", "");
        let after = Placement::new(&config(6, 128, 3), "", "");
        let moved: usize = before
            .replicas
            .iter()
            .map(|(group, old)| {
                let new = &after.replicas[group];
                old.iter().filter(|n| !new.contains(n)).count()
            })
            .sum();
        // Expected about 384/6 = 64 replica moves; far below a reshuffle.
        assert!(moved < 110, "{moved} replicas moved");
    }

    #[test]
    fn replication_is_capped_by_node_count() {
        let placement = Placement::new(
            &ClusterConfig::default(),
            "127.0.0.1:7470",
            "127.0.0.1:17470",
        );
        assert_eq!(placement.nodes.len(), 1);
        assert!(placement.replicas.values().all(|r| r == &vec![1]));
        assert_eq!(placement.groups_of(1).len(), 17);
    }
}
