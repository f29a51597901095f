//! Client-side helpers for Quiver's public API. Today: leader-aware routing.
//! A [`RouteTable`] is built from a node's `GetRoutes` answer and says, for
//! each entity key, the client address of the node that leads the key's
//! shard. A client that sends each row there saves the hop a node makes to
//! forward rows it does not lead (docs/client-routing.md).
//!
//! Routing is an optimisation, never needed for correctness: every node
//! accepts every request and forwards what it does not lead. So a table that
//! is out of date (a leader moved, a shard split) costs a hop, not an error;
//! a write's `rows_forwarded` tells the client to fetch new routes.
//!
//! Architecture invariant: of the Quiver crates, this one depends only on
//! `quiver-proto` (the wire types), and it holds no networking. It must
//! never depend on the engine, the Raft layer or the server: it is what a
//! client links (the engine is a test-only dependency, to check the hash).

use std::collections::BTreeMap;
use std::sync::Arc;

use quiver_proto::v1 as pb;
use xxhash_rust::xxh3::xxh3_64;

/// Most shards a route table accepts (a `GetRoutes` answer with more is
/// refused, not allocated).
pub const ROUTE_SHARDS_MAX: usize = 1 << 16;
/// Most nodes a route table accepts.
pub const ROUTE_NODES_MAX: usize = 4096;
/// Longest node address a route table accepts, in bytes.
pub const ROUTE_ADDR_BYTES_MAX: usize = 512;

/// The placement hash of an entity key: `xxh3_64` of its UTF-8 bytes with
/// seed 0. A key's shard is the one whose arc of the 64-bit ring holds it.
/// The server places rows by the same function (a test checks the two agree).
pub fn entity_hash(entity_key: &str) -> u64 {
    xxh3_64(entity_key.as_bytes())
}

/// Why a `GetRoutes` answer cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// More shards or nodes than the client accepts.
    #[error("{what}: {count}, more than the {max} a route table accepts")]
    TooMany {
        /// Shards or nodes.
        what: &'static str,
        /// How many the answer held.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The shards do not cover the ring once, from 0, in order.
    #[error("shard {shard}: {problem}")]
    BadShard {
        /// The shard at fault.
        shard: u32,
        /// What is wrong with it.
        problem: String,
    },
    /// A node entry is unusable.
    #[error("node {node}: {problem}")]
    BadNode {
        /// The node at fault.
        node: u64,
        /// What is wrong with it.
        problem: String,
    },
}

/// One shard's arc and its leader's address.
#[derive(Debug, Clone)]
struct ShardEntry {
    start: u64,
    shard: u32,
    leader: Option<Arc<str>>,
}

/// Where each shard's leader is, as one node told it: the entity key to node
/// address lookup of leader-aware routing. Cheap to query (a binary search
/// over the shards' starts); rebuilt from a new `GetRoutes` answer when the
/// routes go out of date.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    map_version: u64,
    /// By start, ascending; the first starts at 0.
    shards: Vec<ShardEntry>,
    /// Client address by node id (members only).
    nodes: BTreeMap<u64, Arc<str>>,
}

impl RouteTable {
    /// Checks and indexes a `GetRoutes` answer: the shards must cover the
    /// ring from 0 in ascending order with no gap or overlap; a leader that
    /// is not among the answer's nodes is treated as unknown.
    pub fn new(routes: &pb::GetRoutesResponse) -> Result<RouteTable, RouteError> {
        if routes.shards.len() > ROUTE_SHARDS_MAX {
            return Err(RouteError::TooMany {
                what: "shards",
                count: routes.shards.len(),
                max: ROUTE_SHARDS_MAX,
            });
        }
        if routes.nodes.len() > ROUTE_NODES_MAX {
            return Err(RouteError::TooMany {
                what: "nodes",
                count: routes.nodes.len(),
                max: ROUTE_NODES_MAX,
            });
        }
        let mut nodes = BTreeMap::new();
        for node in &routes.nodes {
            let problem = if node.node_id == 0 {
                // 0 means "no leader known" in a shard's route.
                Some("node id 0 is reserved".to_owned())
            } else if node.addr.is_empty() {
                Some("no address".to_owned())
            } else if node.addr.len() > ROUTE_ADDR_BYTES_MAX {
                Some(format!(
                    "address of {} bytes, more than {ROUTE_ADDR_BYTES_MAX}",
                    node.addr.len()
                ))
            } else if nodes.contains_key(&node.node_id) {
                Some("listed twice".to_owned())
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(RouteError::BadNode {
                    node: node.node_id,
                    problem,
                });
            }
            nodes.insert(node.node_id, Arc::<str>::from(node.addr.as_str()));
        }
        let mut shards = Vec::with_capacity(routes.shards.len());
        let mut shard_ids = std::collections::BTreeSet::new();
        // The first hash the next shard must start at; None: past the end.
        let mut expected = Some(0u64);
        for route in &routes.shards {
            let bad = |problem: String| RouteError::BadShard {
                shard: route.shard,
                problem,
            };
            if !shard_ids.insert(route.shard) {
                return Err(bad("listed twice".into()));
            }
            if route.to_end && route.end != 0 {
                return Err(bad(format!(
                    "ends the ring but names an end {:#x}",
                    route.end
                )));
            }
            match expected {
                None => return Err(bad("listed after the shard that ends the ring".into())),
                Some(start) if route.start != start => {
                    return Err(bad(format!(
                        "starts at {:#x}, the previous shard ends at {start:#x}",
                        route.start
                    )));
                }
                Some(_) => {}
            }
            expected = if route.to_end {
                None
            } else if route.end <= route.start {
                return Err(bad(format!(
                    "ends at {:#x}, not after its start {:#x}",
                    route.end, route.start
                )));
            } else {
                Some(route.end)
            };
            shards.push(ShardEntry {
                start: route.start,
                shard: route.shard,
                leader: nodes.get(&route.leader_node_id).cloned(),
            });
        }
        if routes.shards.is_empty() {
            return Err(RouteError::BadShard {
                shard: 0,
                problem: "no shards listed".into(),
            });
        }
        if let Some(end) = expected {
            return Err(RouteError::BadShard {
                shard: routes.shards.last().map_or(0, |s| s.shard),
                problem: format!("the shards end at {end:#x}, not at the end of the ring"),
            });
        }
        Ok(RouteTable {
            map_version: routes.map_version,
            shards,
            nodes,
        })
    }

    /// The version of the cluster map the routes come from.
    pub fn map_version(&self) -> u64 {
        self.map_version
    }

    /// The members' client addresses, by node id.
    pub fn node_addrs(&self) -> impl Iterator<Item = (u64, &str)> + '_ {
        self.nodes.iter().map(|(&id, addr)| (id, addr.as_ref()))
    }

    fn entry_of_hash(&self, hash: u64) -> Option<&ShardEntry> {
        // The shards cover the ring from 0 (checked in `new`), so the last
        // one starting at or below the hash owns it.
        let after = self.shards.partition_point(|entry| entry.start <= hash);
        after.checked_sub(1).map(|index| &self.shards[index])
    }

    /// The shard owning an entity key (`None`: an empty table).
    pub fn shard_of(&self, entity_key: &str) -> Option<u32> {
        self.entry_of_hash(entity_hash(entity_key))
            .map(|entry| entry.shard)
    }

    /// The client address of the node leading the key's shard (`None`: no
    /// leader known; send the row to any node).
    pub fn leader_addr(&self, entity_key: &str) -> Option<&str> {
        self.entry_of_hash(entity_hash(entity_key))
            .and_then(|entry| entry.leader.as_deref())
    }

    /// Splits items by the leader of their entity key's shard, keeping their
    /// order within each part; items whose shard has no known leader go in
    /// the part keyed `None`. One request per part reaches every leader
    /// directly.
    pub fn by_leader<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        entity_key: impl Fn(&T) -> &str,
    ) -> Vec<(Option<Arc<str>>, Vec<T>)> {
        let mut parts: Vec<(Option<Arc<str>>, Vec<T>)> = Vec::new();
        for item in items {
            let leader = self
                .entry_of_hash(entity_hash(entity_key(&item)))
                .and_then(|entry| entry.leader.clone());
            // Few leaders per request: a linear search beats a map.
            match parts.iter_mut().find(|(addr, _)| *addr == leader) {
                Some((_, part)) => part.push(item),
                None => parts.push((leader, vec![item])),
            }
        }
        parts
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost::Message;

    use super::*;

    fn node(node_id: u64, addr: &str) -> pb::RouteNode {
        pb::RouteNode {
            node_id,
            addr: addr.into(),
            state: "serving".into(),
        }
    }

    /// A table of `starts.len()` shards (starts sorted, the first 0), shard
    /// `i + 1` led by node `i % 3 + 1`.
    fn routes(starts: &[u64]) -> pb::GetRoutesResponse {
        let shards = starts
            .iter()
            .enumerate()
            .map(|(i, &start)| pb::ShardRoute {
                shard: u32::try_from(i + 1).unwrap_or(u32::MAX),
                start,
                end: starts.get(i + 1).copied().unwrap_or(0),
                to_end: i + 1 == starts.len(),
                leader_node_id: (i % 3 + 1) as u64,
                voter_node_ids: vec![1, 2, 3],
            })
            .collect();
        pb::GetRoutesResponse {
            map_version: 7,
            nodes: vec![node(1, "a:1"), node(2, "b:2"), node(3, "c:3")],
            shards,
        }
    }

    #[test]
    fn the_placement_hash_is_the_servers() {
        for key in [
            "",
            "user:1",
            "ünïcode",
            "a much longer entity key, 40 bytes long",
        ] {
            assert_eq!(
                entity_hash(key),
                quiver_engine::keys::entity_hash(key.as_bytes())
            );
        }
    }

    #[test]
    fn a_key_routes_to_its_shards_leader() {
        let table = RouteTable::new(&routes(&[0, 1 << 62, 1 << 63])).expect("valid");
        assert_eq!(table.map_version(), 7);
        for key in ["a", "b", "c", "d", "user:42"] {
            let hash = entity_hash(key);
            let (shard, addr) = if hash < 1 << 62 {
                (1, "a:1")
            } else if hash < 1 << 63 {
                (2, "b:2")
            } else {
                (3, "c:3")
            };
            assert_eq!(table.shard_of(key), Some(shard), "{key}");
            assert_eq!(table.leader_addr(key), Some(addr), "{key}");
        }
    }

    #[test]
    fn an_unknown_or_absent_leader_routes_nowhere() {
        let mut answer = routes(&[0, 1 << 63]);
        answer.shards[0].leader_node_id = 0;
        answer.shards[1].leader_node_id = 9;
        let table = RouteTable::new(&answer).expect("valid");
        assert!(
            ["a", "b", "c", "user:42"]
                .iter()
                .all(|k| table.leader_addr(k).is_none())
        );
        let parts = table.by_leader(["a", "b"], |k| k);
        assert_eq!(parts.len(), 1);
        assert!(parts[0].0.is_none());
    }

    #[test]
    fn bad_answers_are_refused_with_the_reason() {
        let mut gap = routes(&[0, 100, 200]);
        gap.shards[1].end = 150;
        let error = RouteTable::new(&gap).expect_err("a gap");
        assert!(
            error.to_string().contains("shard 3: starts at 0xc8"),
            "{error}"
        );

        let mut late = routes(&[0, 100]);
        late.shards[0].start = 1;
        assert!(RouteTable::new(&late).is_err());

        let mut short = routes(&[0, 100]);
        short.shards[1].to_end = false;
        short.shards[1].end = 200;
        let error = RouteTable::new(&short).expect_err("ends early");
        assert!(
            error.to_string().contains("not at the end of the ring"),
            "{error}"
        );

        let mut twice = routes(&[0]);
        twice.nodes.push(node(1, "d:4"));
        assert!(RouteTable::new(&twice).is_err());

        let mut long = routes(&[0]);
        long.nodes[0].addr = "x".repeat(ROUTE_ADDR_BYTES_MAX + 1);
        assert!(RouteTable::new(&long).is_err());

        let empty = pb::GetRoutesResponse::default();
        assert!(RouteTable::new(&empty).is_err());

        let mut zero = routes(&[0]);
        zero.nodes[0].node_id = 0;
        assert!(RouteTable::new(&zero).is_err(), "node id 0 means no leader");

        let mut repeated = routes(&[0, 100]);
        repeated.shards[1].shard = repeated.shards[0].shard;
        let error = RouteTable::new(&repeated).expect_err("a shard twice");
        assert!(error.to_string().contains("listed twice"), "{error}");

        let mut ends = routes(&[0]);
        ends.shards[0].end = 5;
        assert!(RouteTable::new(&ends).is_err());
    }

    proptest! {
        /// The binary search agrees with a scan of the arcs, and splitting
        /// by leader keeps every item exactly once, in order within a part.
        #[test]
        fn lookup_matches_a_scan(
            mut starts in proptest::collection::btree_set(1u64.., 0..20),
            keys in proptest::collection::vec(".{0,12}", 0..40),
        ) {
            starts.insert(0);
            let starts: Vec<u64> = starts.into_iter().collect();
            let table = RouteTable::new(&routes(&starts)).expect("valid");
            for key in &keys {
                let hash = entity_hash(key);
                let index = starts.iter().rposition(|&s| s <= hash).expect("0 starts");
                prop_assert_eq!(table.shard_of(key), Some(index as u32 + 1));
            }
            let parts = table.by_leader(keys.iter().enumerate(), |(_, k)| k.as_str());
            let mut seen: Vec<usize> = Vec::new();
            for (leader, part) in &parts {
                prop_assert!(part.windows(2).all(|w| w[0].0 < w[1].0));
                for (i, key) in part {
                    prop_assert_eq!(leader.as_deref(), table.leader_addr(key));
                    seen.push(*i);
                }
            }
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..keys.len()).collect::<Vec<_>>());
        }

        /// Arbitrary and mutated answers are refused or accepted, never a
        /// panic; an accepted table answers every key.
        #[test]
        fn arbitrary_answers_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            key in ".{0,16}",
        ) {
            let mut encoded = routes(&[0, 1 << 40, 1 << 63]).encode_to_vec();
            for (at, bits) in flips {
                let len = encoded.len();
                encoded[at % len] ^= bits;
            }
            for candidate in [bytes.as_slice(), encoded.as_slice()] {
                if let Ok(answer) = pb::GetRoutesResponse::decode(candidate)
                    && let Ok(table) = RouteTable::new(&answer)
                {
                    prop_assert!(table.shard_of(&key).is_some());
                    let _ = table.leader_addr(&key);
                }
            }
        }
    }
}
