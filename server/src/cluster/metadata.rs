//! Following the cluster map, and the metadata leader's duties.
//!
//! Every node follows the map its metadata replica applies: it routes by it,
//! keeps a channel to every node it lists, creates the learner replica a
//! move operator places on it, and destroys the replicas the map tombstoned
//! here (then tells the map, which forgets the tombstone).
//!
//! The metadata group's leader also, once a second:
//! - stores the first map (a static cluster's layout) if there is none;
//! - keeps the metadata group's membership in line with the map: every node
//!   that is not removed follows it (a learner), joining nodes that caught
//!   up become serving, and `metadata_voters` voters are kept on serving
//!   nodes (a draining or removed node's vote moves to another node);
//! - runs the operators the map holds (`operator`) and the scheduler
//!   (`scheduler`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, ChangeMembers};
use quiver_raft::cluster_map::{ClusterMap, MapCommand, NodeState, OperatorKind, ReplicaRole};
use quiver_raft::types::RejectKind;
use quiver_raft::{Command, METADATA_GROUP, NodeId, ReplicaId};

use super::placement::Placement;
use super::{Cluster, ClusterError};

/// How often the metadata leader looks at the map and the membership, and
/// every node re-checks what it hosts against the map.
const ROUND: Duration = Duration::from_secs(1);
/// A joining node becomes serving once its metadata replica is at most this
/// many entries behind the leader.
const JOIN_CATCH_UP_ENTRIES_MAX: u64 = 16;

/// Follows the map: on every change (and every [`ROUND`] for retries),
/// routes by it and hosts what it says. Ends when the cluster is dropped.
pub(super) async fn follow_map(
    cluster: Weak<Cluster>,
    mut changes: tokio::sync::watch::Receiver<Option<Arc<ClusterMap>>>,
) {
    loop {
        let map = changes.borrow_and_update().clone();
        {
            let Some(cluster) = cluster.upgrade() else {
                return;
            };
            if cluster.is_stopping() {
                return;
            }
            if let Some(map) = map {
                cluster.adopt_map(map);
            }
            cluster.reconcile_hosted().await;
        }
        // A timeout is a retry round; a closed channel, the end.
        if let Ok(Err(_)) = tokio::time::timeout(ROUND, changes.changed()).await {
            return;
        }
    }
}

/// The metadata leader's round, every [`ROUND`]. Ends when the cluster is
/// dropped.
pub(super) async fn leader_loop(cluster: Weak<Cluster>) {
    let mut ticker = tokio::time::interval(ROUND);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        if cluster.is_stopping() {
            return;
        }
        if !cluster.leads_metadata() {
            continue;
        }
        if let Err(e) = cluster.metadata_round().await {
            tracing::debug!(error = %e, "metadata round");
        }
    }
}

impl Cluster {
    /// Whether this node leads the metadata group.
    pub(super) fn leads_metadata(&self) -> bool {
        self.host.get(METADATA_GROUP).is_some_and(|hosted| {
            hosted.raft.metrics().borrow_watched().state == openraft::ServerState::Leader
        })
    }

    /// Routes by `map` from now on (unless it is older than the one in use).
    fn adopt_map(&self, map: Arc<ClusterMap>) {
        let current = self.placement();
        if current.replicated && current.map.version > map.version {
            return;
        }
        if current.replicated && current.map.version == map.version && *current.map == *map {
            return;
        }
        let placement = Placement::new(map, true);
        if let Err(e) = self.clients.set_nodes(&self.peer_routes(&placement)) {
            tracing::warn!(error = %e, "a node address in the cluster map is unusable");
        }
        self.placement.store(Arc::new(placement));
    }

    /// Opens the learner replicas move operators place here, and destroys
    /// the replicas the map tombstoned here.
    async fn reconcile_hosted(&self) {
        let placement = self.placement();
        if !placement.replicated {
            return;
        }
        let map = &placement.map;
        self.keep_own_addresses(map).await;
        for op in map.operators.values() {
            let OperatorKind::Move { to, .. } = op.kind else {
                continue;
            };
            if to.node() != self.node_id
                || self
                    .host
                    .get(op.shard)
                    .is_some_and(|hosted| hosted.replica == to)
            {
                continue;
            }
            if let Some(old) = self.host.get(op.shard) {
                // The map moves a replica here while an old one of the same
                // shard is still hosted: the old one must be tombstoned and
                // go first (the map refuses a move while it is).
                tracing::warn!(shard = op.shard, old = %old.replica, new = %to, "a new replica waits for the old one to go");
                continue;
            }
            // A learner that never voted: safe to create (again).
            if let Err(e) = self.host.open(op.shard, to, true).await {
                tracing::warn!(shard = op.shard, replica = %to, error = %e, "creating a learner replica");
            }
        }
        let mine: Vec<(quiver_raft::GroupId, ReplicaId)> = map
            .tombstones
            .iter()
            .copied()
            .filter(|(_, replica)| replica.node() == self.node_id)
            .collect();
        for (shard, replica) in mine {
            if let Err(e) = self.host.destroy(shard, replica).await {
                tracing::warn!(shard, %replica, error = %e, "destroying a removed replica");
                continue;
            }
            let done = self
                .propose(
                    METADATA_GROUP,
                    Command::Map(MapCommand::ReplicaDestroyed { shard, replica }),
                )
                .await;
            if let Err(e) = done {
                tracing::debug!(shard, %replica, error = %e, "reporting a destroyed replica");
            }
        }
        // Voters the map places here whose directory is gone are lost: never
        // re-created under their id (they may have voted).
        for (shard, replica) in map.replicas_on(self.node_id) {
            if replica.role == ReplicaRole::Voter && !self.host.contains(shard) {
                tracing::warn!(
                    shard,
                    replica = %replica.id,
                    "the cluster map places a voter here that this node does not have; \
                     move it away (quiverctl shard move)"
                );
            }
        }
    }

    /// A node that joined is known to the others by the map only: if it now
    /// listens elsewhere (restarted on other ports), it says so.
    async fn keep_own_addresses(&self, map: &ClusterMap) {
        if self.layout.is_some() {
            return;
        }
        let Some(info) = map.nodes.get(&self.node_id) else {
            return;
        };
        let (addr, peer_addr) = &self.self_addrs;
        if info.state == NodeState::Removed || (info.addr == *addr && info.peer_addr == *peer_addr)
        {
            return;
        }
        tracing::info!(%addr, %peer_addr, "telling the cluster this node's new addresses");
        let changed = self
            .change_map(MapCommand::SetNodeAddr {
                node: self.node_id,
                addr: addr.clone(),
                peer_addr: peer_addr.clone(),
            })
            .await;
        if let Err(e) = changed {
            tracing::warn!(error = %e, "updating this node's addresses in the cluster map");
        }
    }

    /// Proposes a map change through the metadata leader.
    pub async fn change_map(
        &self,
        command: MapCommand,
    ) -> Result<quiver_raft::cluster_map::MapOutcome, ClusterError> {
        match self.propose(METADATA_GROUP, Command::Map(command)).await? {
            (quiver_raft::Response::Map(outcome), _) => Ok(outcome),
            (other, _) => Err(ClusterError::Rejected {
                kind: RejectKind::Invalid,
                message: format!("unexpected answer to a map change: {other:?}"),
            }),
        }
    }

    /// Adds a node to the map (a join): its id, and the map once this
    /// node's metadata replica has applied the change.
    pub async fn join_node(
        &self,
        addr: String,
        peer_addr: String,
    ) -> Result<(NodeId, Arc<ClusterMap>), ClusterError> {
        let (response, log_id) = self
            .propose(
                METADATA_GROUP,
                Command::Map(MapCommand::AddNode { addr, peer_addr }),
            )
            .await?;
        let quiver_raft::Response::Map(quiver_raft::cluster_map::MapOutcome::NodeAdded { node }) =
            response
        else {
            return Err(ClusterError::Rejected {
                kind: RejectKind::Invalid,
                message: format!("unexpected answer to a join: {response:?}"),
            });
        };
        if !self
            .wait_applied(METADATA_GROUP, log_id.index, self.peer_timeout())
            .await
        {
            return Err(ClusterError::Unavailable {
                group: METADATA_GROUP,
                attempts: 1,
                last: "this node's metadata replica did not apply the join in time".into(),
            });
        }
        let map = self
            .host
            .get(METADATA_GROUP)
            .and_then(|hosted| hosted.state.cluster_map())
            .ok_or_else(|| ClusterError::Unavailable {
                group: METADATA_GROUP,
                attempts: 1,
                last: "no cluster map".into(),
            })?;
        Ok((node, map))
    }

    /// Whether `secret` is the cluster's (or its previous) secret.
    pub fn accepts_secret(&self, secret: &str) -> bool {
        super::auth::CheckPeerCalls::new(&self.config.secret, &self.config.previous_secret)
            .accepts(secret.as_bytes())
    }

    /// Whether this node heard from `node` lately (itself: always).
    pub fn node_up(&self, node: NodeId) -> bool {
        node == self.node_id
            || self
                .liveness
                .is_up(node, self.now_ms(), self.config.liveness_timeout_ms)
    }

    /// What the scheduler would start now, on the map as of a metadata read
    /// index.
    pub async fn plan_replicas(&self) -> Result<Vec<super::scheduler::Planned>, ClusterError> {
        self.sync_metadata().await?;
        let map = self.placement().map.clone();
        let down = self.long_down_nodes(&map);
        Ok(super::scheduler::plan(
            &map,
            &down,
            self.config.operators_max as usize,
        ))
    }

    async fn metadata_round(self: &Arc<Self>) -> Result<(), ClusterError> {
        let Some(hosted) = self.host.get(METADATA_GROUP) else {
            return Ok(());
        };
        let Some(map) = hosted.state.cluster_map() else {
            if let Some(layout) = &self.layout {
                tracing::info!("storing the cluster's first map");
                match self
                    .change_map(MapCommand::Bootstrap(Box::new(layout.map.clone())))
                    .await
                {
                    Ok(_) | Err(ClusterError::Rejected { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok(());
        };
        self.keep_metadata_membership(&map).await?;
        self.run_operators(&map);
        self.schedule(&map).await;
        Ok(())
    }

    /// One step towards the metadata membership the map asks for (one
    /// change per round: each waits for the previous one to commit).
    async fn keep_metadata_membership(&self, map: &ClusterMap) -> Result<(), ClusterError> {
        let Some(hosted) = self.host.get(METADATA_GROUP) else {
            return Ok(());
        };
        let (voters, learners, last_index, matched) = {
            let metrics = hosted.raft.metrics();
            let m = metrics.borrow_watched();
            let membership = m.membership_config.membership();
            if membership.get_joint_config().len() > 1 {
                // A change is under way; openraft finishes it.
                return Ok(());
            }
            let voters: BTreeSet<NodeId> = membership.voter_ids().map(ReplicaId::node).collect();
            let learners: BTreeSet<NodeId> =
                membership.learner_ids().map(ReplicaId::node).collect();
            let matched: BTreeMap<NodeId, u64> = m
                .replication
                .as_ref()
                .map(|replication| {
                    replication
                        .iter()
                        .map(|(id, log)| (id.node(), log.as_ref().map_or(0, |l| l.index)))
                        .collect()
                })
                .unwrap_or_default();
            (voters, learners, m.last_log_index.unwrap_or(0), matched)
        };
        let change = metadata_change(map, &voters, &learners);
        if let Some(change) = change {
            self.activity(METADATA_GROUP).await;
            tracing::info!(?change, "changing the metadata group's membership");
            let result = match change {
                MetadataChange::AddLearner(node) => {
                    let addr = map
                        .nodes
                        .get(&node)
                        .map(|info| info.peer_addr.clone())
                        .unwrap_or_default();
                    hosted
                        .raft
                        .add_learner(ReplicaId::first(node), BasicNode::new(addr), false)
                        .await
                        .map(|_| ())
                }
                MetadataChange::Voters(next) => hosted
                    .raft
                    .change_membership(
                        ChangeMembers::ReplaceAllVoters(
                            next.into_iter().map(ReplicaId::first).collect(),
                        ),
                        true,
                    )
                    .await
                    .map(|_| ()),
                MetadataChange::Remove(node) => hosted
                    .raft
                    .change_membership(
                        ChangeMembers::RemoveNodes(BTreeSet::from([ReplicaId::first(node)])),
                        false,
                    )
                    .await
                    .map(|_| ()),
            };
            if let Err(e) = result {
                tracing::info!(error = %e, "metadata membership change not made; retried next round");
            }
            return Ok(());
        }
        // Joining nodes whose metadata replica caught up start serving.
        for (&node, info) in &map.nodes {
            if info.state != NodeState::Joining || !learners.contains(&node) {
                continue;
            }
            let caught_up = matched
                .get(&node)
                .is_some_and(|&index| index + JOIN_CATCH_UP_ENTRIES_MAX >= last_index);
            if caught_up {
                tracing::info!(node, "a joining node caught up: serving");
                self.change_map(MapCommand::SetNodeState {
                    node,
                    state: NodeState::Serving,
                    force: false,
                })
                .await?;
            }
        }
        Ok(())
    }
}

/// A change of the metadata group's membership.
#[derive(Debug, Clone, PartialEq, Eq)]
enum MetadataChange {
    /// Add a node's replica as a learner.
    AddLearner(NodeId),
    /// Make these nodes the voters (the others stay learners).
    Voters(BTreeSet<NodeId>),
    /// Remove a (removed) node's replica.
    Remove(NodeId),
}

/// The next change that brings the metadata membership (voters and learners
/// by node) in line with the map, if any: learners first (a node must
/// follow before it can vote), then the voters (as many as
/// `metadata_voters` and serving nodes allow, keeping current voters on
/// serving nodes), then removals.
fn metadata_change(
    map: &ClusterMap,
    voters: &BTreeSet<NodeId>,
    learners: &BTreeSet<NodeId>,
) -> Option<MetadataChange> {
    let member = |node: &NodeId| voters.contains(node) || learners.contains(node);
    if let Some((&node, _)) = map
        .nodes
        .iter()
        .find(|(node, info)| info.state != NodeState::Removed && !member(node))
    {
        return Some(MetadataChange::AddLearner(node));
    }
    let serving: BTreeSet<NodeId> = map.serving_nodes().collect();
    let wanted = (map.metadata_voters as usize).clamp(1, serving.len().max(1));
    let mut next: BTreeSet<NodeId> = voters
        .iter()
        .copied()
        .filter(|node| serving.contains(node))
        .take(wanted)
        .collect();
    for node in &serving {
        if next.len() >= wanted {
            break;
        }
        if learners.contains(node) {
            next.insert(*node);
        }
    }
    // Never leave the group without a voter (no serving node: keep them).
    if !next.is_empty() && next != *voters {
        return Some(MetadataChange::Voters(next));
    }
    map.nodes
        .iter()
        .find(|(node, info)| {
            info.state == NodeState::Removed && learners.contains(node) && !voters.contains(node)
        })
        .map(|(&node, _)| MetadataChange::Remove(node))
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_raft::cluster_map::NodeInfo;

    fn map_with(states: &[(NodeId, NodeState)], metadata_voters: u32) -> ClusterMap {
        let nodes = states
            .iter()
            .map(|&(id, state)| {
                (
                    id,
                    NodeInfo {
                        addr: format!("h:{id}"),
                        peer_addr: format!("p:{id}"),
                        state,
                    },
                )
            })
            .collect();
        let replicas = BTreeMap::from([(1, vec![states[0].0])]);
        ClusterMap::bootstrap(nodes, &replicas, 3, metadata_voters)
    }

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn the_metadata_membership_follows_the_map_one_step_at_a_time() {
        use NodeState::*;
        // One node, a second joins: it becomes a learner first.
        let map = map_with(&[(1, Serving), (2, Joining)], 3);
        assert_eq!(
            metadata_change(&map, &set(&[1]), &set(&[])),
            Some(MetadataChange::AddLearner(2))
        );
        // A joining learner does not vote yet.
        assert_eq!(metadata_change(&map, &set(&[1]), &set(&[2])), None);
        // Serving: it votes, up to three voters.
        let map = map_with(&[(1, Serving), (2, Serving), (3, Serving), (4, Serving)], 3);
        assert_eq!(
            metadata_change(&map, &set(&[1]), &set(&[2, 3, 4])),
            Some(MetadataChange::Voters(set(&[1, 2, 3])))
        );
        assert_eq!(metadata_change(&map, &set(&[1, 2, 3]), &set(&[4])), None);
        // Draining node 1: its vote moves to node 4.
        let map = map_with(
            &[(1, Draining), (2, Serving), (3, Serving), (4, Serving)],
            3,
        );
        assert_eq!(
            metadata_change(&map, &set(&[1, 2, 3]), &set(&[4])),
            Some(MetadataChange::Voters(set(&[2, 3, 4])))
        );
        // Removed node 1, now a learner: removed from the group.
        let map = map_with(&[(1, Removed), (2, Serving), (3, Serving), (4, Serving)], 3);
        assert_eq!(
            metadata_change(&map, &set(&[2, 3, 4]), &set(&[1])),
            Some(MetadataChange::Remove(1))
        );
        assert_eq!(metadata_change(&map, &set(&[2, 3, 4]), &set(&[])), None);
    }
}
