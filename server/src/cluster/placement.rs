//! Where data lives, as this node last learned it: the cluster map (nodes,
//! shards as arcs of the 64-bit key-hash ring, each shard's replicas) with a
//! range index for finding a key's shard.
//!
//! The map is state of the metadata group ([`quiver_raft::cluster_map`]);
//! every node routes by the copy its metadata replica has applied. Before the
//! metadata group has stored a map (a new static cluster), every node routes
//! by the map it would bootstrap from its configuration, which is the same on
//! every node: shard `s` of `S` owns hashes `[(s-1)·2⁶⁴/S, s·2⁶⁴/S)` and its
//! replicas are the `rf` nodes with the highest `xxh3(shard, node)` score
//! (rendezvous hashing: deterministic, and adding a node moves only the
//! shards it now wins).

use std::collections::BTreeMap;
use std::sync::Arc;

use quiver_raft::cluster_map::{ClusterMap, NodeInfo, NodeState, ShardDesc};
use quiver_raft::{GroupId, METADATA_GROUP, NodeId, ReplicaId};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::config::{ClusterConfig, NodeAddr};

/// The cluster map and its range index.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The map.
    pub map: Arc<ClusterMap>,
    /// Whether the map is the metadata group's (false: this node's
    /// configuration, before the group stored one).
    pub replicated: bool,
    /// Shard by first hash.
    ranges: BTreeMap<u64, GroupId>,
    /// Shards' descriptors learned from their replicas at a newer range
    /// version than the map's (kept until the map reaches it).
    learned: BTreeMap<GroupId, RouteHint>,
}

/// A shard's range and replicas as one of its replicas has applied them:
/// what a refusal for a split carries, so the router can route again
/// without waiting for the cluster map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteHint {
    /// The shard.
    pub shard: GroupId,
    /// First hash of its arc.
    pub start: u64,
    /// First hash past it (`None`: the end of the ring).
    pub end: Option<u64>,
    /// Its range version (splits that changed it).
    pub version: u64,
    /// The nodes holding its voters.
    pub voters: Vec<NodeId>,
    /// The node leading it, as the replica that answered knows.
    pub leader: Option<NodeId>,
}

impl Placement {
    /// The placement of `map` (which must pass [`ClusterMap::check`]).
    pub fn new(map: Arc<ClusterMap>, replicated: bool) -> Placement {
        Self::with_learned(map, replicated, BTreeMap::new())
    }

    /// The placement of `map` and of the learned descriptors still newer
    /// than it.
    fn with_learned(
        map: Arc<ClusterMap>,
        replicated: bool,
        mut learned: BTreeMap<GroupId, RouteHint>,
    ) -> Placement {
        learned.retain(|shard, hint| {
            map.shards
                .get(shard)
                .is_none_or(|desc| desc.epoch.version < hint.version)
        });
        let mut ranges: BTreeMap<u64, GroupId> = map
            .shards
            .iter()
            .filter(|(id, _)| !learned.contains_key(id))
            .map(|(&id, desc)| (desc.start, id))
            .collect();
        // A split keeps the parent's start and adds the child's: the
        // learned arcs lie over the map's older ones.
        for hint in learned.values() {
            ranges.insert(hint.start, hint.shard);
        }
        Placement {
            map,
            replicated,
            ranges,
            learned,
        }
    }

    /// The same map with `map` adopted: learned descriptors the new map
    /// has not reached yet are kept.
    pub fn adopting(&self, map: Arc<ClusterMap>, replicated: bool) -> Placement {
        Self::with_learned(map, replicated, self.learned.clone())
    }

    /// This placement with `hints` taken in where they are newer than what
    /// it knows of their shards; `None` when none is.
    pub fn learn(&self, hints: &[RouteHint]) -> Option<Placement> {
        let newer: Vec<&RouteHint> = hints
            .iter()
            .filter(|hint| {
                let known = self
                    .learned
                    .get(&hint.shard)
                    .map(|learned| learned.version)
                    .or_else(|| self.shard(hint.shard).map(|desc| desc.epoch.version));
                known.is_none_or(|version| version < hint.version)
            })
            .collect();
        if newer.is_empty() {
            return None;
        }
        let mut learned = self.learned.clone();
        for hint in newer {
            learned.insert(hint.shard, hint.clone());
        }
        Some(Self::with_learned(
            self.map.clone(),
            self.replicated,
            learned,
        ))
    }

    /// Descriptors learned ahead of the map.
    pub fn learned(&self) -> impl Iterator<Item = &RouteHint> {
        self.learned.values()
    }

    /// The shard owning a key hash.
    pub fn shard_of_hash(&self, hash: u64) -> GroupId {
        // The shards cover the ring from 0 (a checked map), so some shard
        // starts at or below any hash.
        self.ranges
            .range(..=hash)
            .next_back()
            .map_or(1, |(_, &shard)| shard)
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

    /// A shard's descriptor.
    pub fn shard(&self, group: GroupId) -> Option<&ShardDesc> {
        self.map.shards.get(&group)
    }

    /// The nodes holding a voter of a shard, in replica order (empty for the
    /// metadata group, whose members the map does not hold).
    pub fn shard_voters(&self, group: GroupId) -> Vec<NodeId> {
        match self.shard(group) {
            Some(desc) => desc.voters().map(ReplicaId::node).collect(),
            None => self
                .learned
                .get(&group)
                .map(|hint| hint.voters.clone())
                .unwrap_or_default(),
        }
    }

    /// A node's entry.
    pub fn node(&self, node: NodeId) -> Option<&NodeInfo> {
        self.map.nodes.get(&node)
    }

    /// The nodes that are part of the cluster (not removed): id and peer
    /// address.
    pub fn peer_addrs(&self) -> BTreeMap<NodeId, String> {
        self.map
            .nodes
            .iter()
            .filter(|(_, info)| info.state != NodeState::Removed)
            .map(|(&id, info)| (id, info.peer_addr.clone()))
            .collect()
    }

    /// Whether `node` is part of the cluster (not removed).
    pub fn is_member(&self, node: NodeId) -> bool {
        self.node(node)
            .is_some_and(|info| info.state != NodeState::Removed)
    }
}

/// What a static cluster description bootstraps: the map, and the voters
/// of the metadata group.
#[derive(Debug, Clone)]
pub struct StaticLayout {
    /// The first map.
    pub map: ClusterMap,
    /// The metadata group's first voters (the others follow as learners).
    pub metadata_voters: Vec<NodeId>,
}

impl StaticLayout {
    /// The layout of a cluster description (this node's client and peer
    /// addresses are used when the description is empty: a one-node
    /// cluster). A node without a usable peer address is refused by config
    /// validation; here it maps to its client address.
    pub fn new(config: &ClusterConfig, self_addr: &str, self_peer_addr: &str) -> StaticLayout {
        let nodes: BTreeMap<NodeId, NodeInfo> = if config.nodes.is_empty() {
            BTreeMap::from([(
                config.node_id,
                NodeInfo {
                    addr: self_addr.to_owned(),
                    peer_addr: self_peer_addr.to_owned(),
                    state: NodeState::Serving,
                },
            )])
        } else {
            config
                .nodes
                .iter()
                .map(|node: &NodeAddr| {
                    (
                        node.id,
                        NodeInfo {
                            addr: node.addr.clone(),
                            peer_addr: node.peer_addr().unwrap_or_else(|| node.addr.clone()),
                            state: NodeState::Serving,
                        },
                    )
                })
                .collect()
        };
        let ids: Vec<NodeId> = nodes.keys().copied().collect();
        let rf = (config.replication_factor as usize).min(ids.len());
        let replicas: BTreeMap<GroupId, Vec<NodeId>> = (1..=config.initial_shards())
            .map(|shard| (shard, rendezvous(shard, &ids, rf)))
            .collect();
        let metadata_voters = rendezvous(
            METADATA_GROUP,
            &ids,
            (config.metadata_voters as usize).min(ids.len()),
        );
        StaticLayout {
            map: ClusterMap::bootstrap(
                nodes,
                &replicas,
                config.replication_factor,
                config.metadata_voters,
            ),
            metadata_voters,
        }
    }

    /// The voters a static cluster initializes a group with, best first
    /// (the first one initializes it).
    pub fn voters(&self, group: GroupId) -> Vec<NodeId> {
        if group == METADATA_GROUP {
            return self.metadata_voters.clone();
        }
        // Bootstrapped in rendezvous order, which `ClusterMap::bootstrap`
        // sorted by id: recompute the order from the scores.
        let ids: Vec<NodeId> = self
            .map
            .shards
            .get(&group)
            .map(|desc| desc.voters().map(ReplicaId::node).collect())
            .unwrap_or_default();
        rendezvous(group, &ids, ids.len())
    }

    /// Groups a static cluster's first start creates on `node`, metadata
    /// group first.
    pub fn groups_of(&self, node: NodeId) -> Vec<GroupId> {
        let mut groups = vec![METADATA_GROUP];
        groups.extend(
            self.map
                .shards
                .iter()
                .filter(|(_, desc)| desc.replica_on(node).is_some())
                .map(|(&group, _)| group),
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

    fn placement(layout: &StaticLayout) -> Placement {
        Placement::new(Arc::new(layout.map.clone()), false)
    }

    #[test]
    fn shards_cover_the_ring_in_order() {
        let placement = placement(&StaticLayout::new(&config(3, 16, 3), "", ""));
        assert_eq!(placement.shard_of_hash(0), 1);
        assert_eq!(placement.shard_of_hash(u64::MAX), 16);
        assert_eq!(placement.shard_of_hash(1 << 60), 2);
        let mut last = 1;
        for step in 0..1000u64 {
            let hash = step.wrapping_mul(u64::MAX / 1000);
            let shard = placement.shard_of_hash(hash);
            assert!(shard >= last && shard <= 16);
            assert_eq!(Some(shard), placement.map.shard_of_hash(hash));
            last = shard;
        }
    }

    #[test]
    fn a_split_s_descriptors_route_ahead_of_the_map_until_it_records_the_split() {
        let layout = StaticLayout::new(&config(3, 2, 3), "", "");
        let old = placement(&layout);
        let at = 1u64 << 62;
        let parent = RouteHint {
            shard: 1,
            start: 0,
            end: Some(at),
            version: 1,
            voters: vec![1, 2, 3],
            leader: Some(2),
        };
        let child = RouteHint {
            shard: 3,
            start: at,
            end: Some(1 << 63),
            version: 1,
            voters: vec![1, 2, 3],
            leader: Some(2),
        };
        assert_eq!(old.shard_of_hash(at), 1);
        let learned = old.learn(&[parent.clone(), child.clone()]).unwrap();
        assert_eq!(learned.shard_of_hash(at - 1), 1);
        assert_eq!(learned.shard_of_hash(at), 3);
        assert_eq!(learned.shard_of_hash(1 << 63), 2);
        assert_eq!(learned.shard_voters(3), vec![1, 2, 3]);
        // Nothing newer: nothing to learn (a lagging replica's answer).
        assert!(learned.learn(&[parent.clone(), child.clone()]).is_none());
        let mut stale = parent.clone();
        stale.version = 0;
        stale.end = None;
        assert!(learned.learn(&[stale]).is_none());
        // A map from before the split keeps what was learned.
        let kept = learned.adopting(old.map.clone(), true);
        assert_eq!(kept.shard_of_hash(at), 3);
        // The map that records it takes over.
        let mut map = (*old.map).clone();
        let shard = map.shards.get_mut(&1).unwrap();
        shard.end = Some(at);
        shard.epoch.version = 1;
        let mut desc = shard.clone();
        desc.start = at;
        desc.end = Some(1 << 63);
        desc.split_from = Some((1, 10));
        map.shards.insert(3, desc);
        let adopted = learned.adopting(Arc::new(map), true);
        assert_eq!(adopted.learned().count(), 0);
        assert_eq!(adopted.shard_of_hash(at), 3);
        assert_eq!(adopted.shard_of_hash(at - 1), 1);
    }

    #[test]
    fn replicas_are_distinct_deterministic_and_balanced() {
        let layout = StaticLayout::new(&config(5, 64, 3), "", "");
        let again = StaticLayout::new(&config(5, 64, 3), "", "");
        assert_eq!(layout.map, again.map);
        let mut per_node = BTreeMap::<NodeId, usize>::new();
        for desc in layout.map.shards.values() {
            assert_eq!(desc.replicas.len(), 3);
            for replica in &desc.replicas {
                assert_eq!(replica.id.incarnation(), 0);
                *per_node.entry(replica.id.node()).or_default() += 1;
            }
        }
        // 192 replicas over 5 nodes: none starved, none hoarding.
        assert!(
            per_node.values().all(|&n| (20..=60).contains(&n)),
            "{per_node:?}"
        );
        assert_eq!(layout.metadata_voters.len(), 3);
        // The first voter of a shard is its best rendezvous score, as
        // before the map existed (existing clusters initialized that way).
        for shard in 1..=64 {
            let ids: Vec<NodeId> = (1..=5).collect();
            assert_eq!(layout.voters(shard), rendezvous(shard, &ids, 3));
        }
    }

    #[test]
    fn adding_a_node_moves_few_replicas() {
        let before = StaticLayout::new(&config(5, 128, 3), "", "");
        let after = StaticLayout::new(&config(6, 128, 3), "", "");
        let moved: usize = before
            .map
            .shards
            .iter()
            .map(|(group, old)| {
                let new = &after.map.shards[group];
                old.replicas.iter().filter(|r| !new.has(r.id)).count()
            })
            .sum();
        // Expected about 384/6 = 64 replica moves; far below a reshuffle.
        assert!(moved < 110, "{moved} replicas moved");
    }

    #[test]
    fn replication_is_capped_by_node_count() {
        let layout = StaticLayout::new(
            &ClusterConfig::default(),
            "127.0.0.1:7470",
            "127.0.0.1:17470",
        );
        assert_eq!(layout.map.nodes.len(), 1);
        assert!(
            layout
                .map
                .shards
                .values()
                .all(|d| d.voters().eq([ReplicaId::first(1)]))
        );
        // The metadata group and one shard.
        assert_eq!(layout.groups_of(1).len(), 2);
        assert_eq!(layout.map.nodes[&1].peer_addr, "127.0.0.1:17470");
    }

    #[test]
    fn a_new_cluster_starts_with_one_shard_by_default_or_one_per_node_on_zero() {
        let default = ClusterConfig::default().shard_count;
        let layout = StaticLayout::new(&config(3, default, 3), "", "");
        assert_eq!(layout.map.shards.len(), 1, "the default");
        let layout = StaticLayout::new(&config(3, 0, 3), "", "");
        assert_eq!(layout.map.shards.len(), 3);
        let layout = StaticLayout::new(&config(5, 0, 3), "", "");
        assert_eq!(layout.map.shards.len(), 5);
        let layout = StaticLayout::new(&config(3, 7, 3), "", "");
        assert_eq!(layout.map.shards.len(), 7, "shard_count when given");
    }
}
