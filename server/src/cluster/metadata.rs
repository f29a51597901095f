//! Following the cluster map, and the metadata leader's duties.
//!
//! Every node follows the map its metadata replica applies: it routes by it
//! and keeps a channel to every node it lists (`follow_map`, at once on
//! every change). Every round it also brings what it hosts in line with the
//! map (`reconcile_loop`):
//! - it hosts every replica the map places here: an existing directory is
//!   opened; a missing one is created empty only if this node never hosted
//!   that group at that incarnation or a later one (`host`'s `HOSTED`
//!   record), so a stale map can create only replicas that never ran (a
//!   move's learner, the child of a split this node's replica skipped by
//!   installing a snapshot), never one that may have voted;
//! - it destroys the replicas the map tombstoned here and tells the map,
//!   which forgets the tombstone;
//! - it destroys replicas the map does not know, once a metadata read index
//!   confirmed its map is current (leftovers of cancelled moves; shards the
//!   map does not list yet, such as a split's child before the map records
//!   the split, are left alone).
//!
//! The metadata group's leader also, once a round:
//! - stores the first map (a static cluster's layout) if there is none;
//! - keeps the metadata group's membership in line with the map: every node
//!   that is not removed follows it (a learner), joining nodes that caught
//!   up become serving, and up to `metadata_voters` voters (an odd number
//!   above two) sit on serving nodes that are up and caught up (a
//!   draining or removed node's vote moves to another node; a joint
//!   membership left by a leader change is finished);
//! - runs the operators the map holds (`operator`) and the scheduler
//!   (`scheduler`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, ChangeMembers};
use quiver_raft::cluster_map::{ClusterMap, MapCommand, MapOutcome, NodeState};
use quiver_raft::types::{LogId, RejectKind};
use quiver_raft::{Command, GroupId, METADATA_GROUP, NodeId, ReplicaId};

use super::{Cluster, ClusterError};

/// How often the metadata leader looks at the map and the membership, and
/// every node re-checks what it hosts against the map.
const ROUND: Duration = Duration::from_secs(1);
/// A joining node becomes serving, and a learner may vote, once its
/// metadata replica is at most this many entries behind the leader.
const CATCH_UP_ENTRIES_MAX: u64 = 16;

/// Follows the map: routes by every new one at once. Ends when the cluster
/// is dropped.
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
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Brings what this node hosts in line with the map, every [`ROUND`]. Ends
/// when the cluster is dropped.
pub(super) async fn reconcile_loop(cluster: Weak<Cluster>) {
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
        cluster.reconcile_hosted().await;
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

/// The scheduler's plan, as `quiverctl rebalance` shows it.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Operators, with the round each starts in (1: now).
    pub operators: Vec<(u32, super::scheduler::Planned)>,
    /// Leadership handovers, in order.
    pub handovers: Vec<super::scheduler::PlannedHandover>,
}

impl Cluster {
    /// Whether this node leads the metadata group.
    pub(super) fn leads_metadata(&self) -> bool {
        self.host.get(METADATA_GROUP).is_some_and(|hosted| {
            hosted.raft.metrics().borrow_watched().state == openraft::ServerState::Leader
        })
    }

    /// The map this node's metadata replica has applied.
    pub(super) fn applied_map(&self) -> Option<Arc<ClusterMap>> {
        self.host
            .get(METADATA_GROUP)
            .and_then(|hosted| hosted.state.cluster_map())
    }

    /// The map as of a metadata read index taken now: every map change
    /// acknowledged before this call is in it.
    pub async fn current_map(&self) -> Result<Arc<ClusterMap>, ClusterError> {
        self.sync_metadata().await?;
        self.applied_map().ok_or_else(|| ClusterError::Unavailable {
            group: METADATA_GROUP,
            attempts: 1,
            last: "the cluster map is not stored yet".into(),
        })
    }

    /// [`Self::current_map`], or before the metadata group stored its first
    /// map, the static layout this node routes by (then `false`): what an
    /// operator's view of the cluster starts from.
    pub async fn current_or_static_map(&self) -> Result<(Arc<ClusterMap>, bool), ClusterError> {
        match self.current_map().await {
            Ok(map) => Ok((map, true)),
            Err(_) if !self.placement().replicated => Ok((self.placement().map.clone(), false)),
            Err(e) => Err(e),
        }
    }

    /// Routes by `map` from now on (unless it is older than the one in use).
    fn adopt_map(&self, map: Arc<ClusterMap>) {
        let current = self.placement();
        if current.replicated && current.map.version >= map.version && *current.map == *map {
            return;
        }
        if current.replicated && current.map.version > map.version {
            return;
        }
        // Peers first: nothing routes to a node the clients cannot reach.
        let placement = current.adopting(map.clone(), true);
        if let Err(e) = self.clients.set_nodes(&self.peer_routes(&placement)) {
            tracing::warn!(error = %e, "a node address in the cluster map is unusable");
        }
        // Descriptors learned from a split's refusals stay until the map
        // records the split, including ones learned meanwhile; a newer map
        // stored meanwhile stays.
        self.placement.rcu(|now| {
            if now.replicated && now.map.version > map.version {
                Arc::clone(now)
            } else {
                Arc::new(now.adopting(map.clone(), true))
            }
        });
    }

    /// One reconcile round (see the module doc).
    async fn reconcile_hosted(&self) {
        let Some(map) = self.applied_map() else {
            return;
        };
        self.keep_own_addresses(&map).await;
        // Host what the map places here.
        for (shard, replica) in map.replicas_on(self.node_id) {
            if self
                .host
                .get(shard)
                .is_some_and(|hosted| hosted.replica == replica.id)
            {
                continue;
            }
            if map.tombstones.contains(&(shard, replica.id)) {
                continue;
            }
            if let Some(old) = self.host.get(shard) {
                // Another replica of the shard is still hosted here: it goes
                // first (tombstoned, or a stray below).
                tracing::debug!(shard, old = %old.replica, new = %replica.id, "a replica waits for the old one to go");
                continue;
            }
            // A split's child is built by this node's replica of the parent
            // (the same id) when it applies the split: not created empty
            // while that replica has yet to (the child would hold nothing of
            // the moved half here; only one that skipped the split by
            // installing a snapshot leaves its child to be created).
            let parent_pending = map
                .shards
                .get(&shard)
                .and_then(|desc| desc.split_from)
                .is_some_and(|(parent, index)| {
                    self.host.get(parent).is_some_and(|hosted| {
                        hosted.replica == replica.id
                            && hosted.state.applied().is_none_or(|id| id.index < index)
                    })
                });
            if parent_pending {
                continue;
            }
            if let Err(e) = self.host.open(shard, replica.id, true).await {
                tracing::warn!(shard, replica = %replica.id, error = %e, "hosting a replica the map places here");
            }
        }
        // Destroy what the map tombstoned here.
        let tombstoned: Vec<(GroupId, ReplicaId)> = map
            .tombstones
            .iter()
            .copied()
            .filter(|(_, replica)| replica.node() == self.node_id)
            .collect();
        for (shard, replica) in tombstoned {
            if let Err(e) = self.host.destroy(shard, replica).await {
                tracing::warn!(shard, %replica, error = %e, "destroying a removed replica");
                continue;
            }
            let done = self
                .change_map(MapCommand::ReplicaDestroyed { shard, replica })
                .await;
            if let Err(e) = done {
                tracing::debug!(shard, %replica, error = %e, "reporting a destroyed replica");
            }
        }
        // Replicas the map does not know, in shards it does: gone for good,
        // but only a current map may say so.
        let strays = |map: &ClusterMap| -> Vec<(GroupId, ReplicaId)> {
            self.host
                .all()
                .into_iter()
                .filter(|(group, _)| *group != METADATA_GROUP)
                .filter(|(group, hosted)| {
                    map.shards
                        .get(group)
                        .is_some_and(|desc| !desc.has(hosted.replica))
                })
                .map(|(group, hosted)| (group, hosted.replica))
                .collect()
        };
        if strays(&map).is_empty() {
            return;
        }
        let Ok(current) = self.current_map().await else {
            return;
        };
        for (shard, replica) in strays(&current) {
            tracing::warn!(shard, %replica, "destroying a replica the cluster map does not know");
            if let Err(e) = self.host.destroy(shard, replica).await {
                tracing::warn!(shard, %replica, error = %e, "destroying a stray replica");
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
    pub async fn change_map(&self, command: MapCommand) -> Result<MapOutcome, ClusterError> {
        self.change_map_at(command)
            .await
            .map(|(outcome, _)| outcome)
    }

    /// [`Self::change_map`], with the entry's log id.
    async fn change_map_at(
        &self,
        command: MapCommand,
    ) -> Result<(MapOutcome, LogId), ClusterError> {
        match self.propose(METADATA_GROUP, Command::Map(command)).await? {
            (quiver_raft::Response::Map(outcome), log_id) => Ok((outcome, log_id)),
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
        let (outcome, log_id) = self
            .change_map_at(MapCommand::AddNode { addr, peer_addr })
            .await?;
        let MapOutcome::NodeAdded { node } = outcome else {
            return Err(ClusterError::Rejected {
                kind: RejectKind::Invalid,
                message: format!("unexpected answer to a join: {outcome:?}"),
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
            .applied_map()
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

    /// What the scheduler would do, on the map as of a metadata read
    /// index: the operators it starts now (round 1) or, with `all_rounds`,
    /// every round until it has nothing left to do
    /// ([`super::scheduler::plan_rounds`]); and the leadership handovers
    /// the leader balancer would make on the leaders reported now.
    /// `by_hand`: for operators started by hand, which the scheduler's rate
    /// of moves per node does not limit.
    pub async fn plan_replicas(
        &self,
        all_rounds: bool,
        by_hand: bool,
    ) -> Result<Plan, ClusterError> {
        let map = self.current_map().await?;
        let operators = if all_rounds {
            let (down, splits, limited) = self.plan_inputs(&map, by_hand);
            super::scheduler::plan_rounds(
                &map,
                &down,
                self.config.operators_max as usize,
                &splits,
                &self.shard_sizes(&map),
                &limited,
                |shard| self.operator_backing_off(shard),
            )
        } else {
            self.plan_for(&map, by_hand)
                .into_iter()
                .map(|p| (1, p))
                .collect()
        };
        let (mut leaders, up) = self.leadership(&map);
        // Asked by hand right after a change (a restart, a handover made
        // elsewhere): what this node's own replicas know is newer than the
        // last load report.
        for (group, hosted) in self.host.all() {
            if !map.shards.contains_key(&group) {
                continue;
            }
            if let Some(leader) = hosted.raft.metrics().borrow_watched().current_leader {
                leaders.insert(group, leader.node());
            }
        }
        Ok(Plan {
            operators,
            handovers: super::scheduler::plan_leaders(&map, &leaders, &up),
        })
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
        let (voters, learners, joint, membership_log_id, caught_up) = {
            let metrics = hosted.raft.metrics();
            let m = metrics.borrow_watched();
            let membership = m.membership_config.membership();
            let voters: BTreeSet<NodeId> = membership.voter_ids().map(ReplicaId::node).collect();
            let learners: BTreeSet<NodeId> =
                membership.learner_ids().map(ReplicaId::node).collect();
            let last_index = m.last_log_index.unwrap_or(0);
            // Only a learner that has answered, and is close behind, counts
            // as caught up (a node that never answered matches nothing).
            let caught_up: BTreeSet<NodeId> = m
                .replication
                .as_ref()
                .map(|replication| {
                    replication
                        .iter()
                        .filter_map(|(id, log)| {
                            let index = log.as_ref()?.index;
                            (index + CATCH_UP_ENTRIES_MAX >= last_index).then_some(id.node())
                        })
                        .collect()
                })
                .unwrap_or_default();
            (
                voters,
                learners,
                membership.get_joint_config().len() > 1,
                *m.membership_config.log_id(),
                caught_up,
            )
        };
        let precondition = openraft::raft::Precondition::LastMembershipLogId {
            last_membership_log_id: membership_log_id,
        };
        let ready = |node: NodeId| {
            node == self.node_id || (self.node_up(node) && caught_up.contains(&node))
        };
        let change = if joint {
            // A leader change or crash between the two steps of a voter
            // change leaves the group joint; openraft does not finish it.
            Some(MetadataChange::Flatten)
        } else {
            metadata_change(map, &voters, &learners, ready)
        };
        // A leader that takes itself out of the voters leaves the group
        // without a leader until the others' leases run out (about a
        // second in which no view resolves and no map changes): it hands
        // leadership to a voter that stays, which makes the change.
        // (A removal only takes out learners, never the leader.)
        let successor = match &change {
            Some(MetadataChange::Voters(next)) if !next.contains(&self.node_id) => next
                .iter()
                .copied()
                .find(|&n| voters.contains(&n) && ready(n)),
            _ => None,
        };
        if let Some(to) = successor {
            tracing::info!(
                to,
                "handing the metadata group over before leaving its voters"
            );
            match self.transfer_leader(METADATA_GROUP, to).await {
                Ok(_) => return Ok(()),
                // Left as it was before: the change is made all the same.
                Err(e) => tracing::info!(to, error = %e, "metadata handover failed"),
            }
        }
        if let Some(change) = change {
            self.activity(METADATA_GROUP).await;
            tracing::info!(?change, "changing the metadata group's membership");
            let (changes, retain) = match change {
                MetadataChange::AddLearner(node) => {
                    let addr = map
                        .nodes
                        .get(&node)
                        .map(|info| info.peer_addr.clone())
                        .unwrap_or_default();
                    (
                        ChangeMembers::AddNodes(BTreeMap::from([(
                            ReplicaId::first(node),
                            BasicNode::new(addr),
                        )])),
                        true,
                    )
                }
                MetadataChange::Voters(next) => (
                    ChangeMembers::ReplaceAllVoters(
                        next.into_iter().map(ReplicaId::first).collect(),
                    ),
                    true,
                ),
                MetadataChange::Remove(node) => (
                    ChangeMembers::RemoveNodes(BTreeSet::from([ReplicaId::first(node)])),
                    false,
                ),
                MetadataChange::Flatten => (ChangeMembers::AddVoterIds(BTreeSet::new()), true),
            };
            // Bounded: a change without a quorum must not hold up the
            // operators and the scheduler of this round forever.
            let result = tokio::time::timeout(
                self.peer_timeout(),
                hosted
                    .raft
                    .change_membership_if(changes, retain, [precondition]),
            )
            .await;
            match result {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::info!(error = %e, "metadata membership change not made; retried next round");
                }
                Err(_) => {
                    tracing::info!("metadata membership change timed out; retried next round")
                }
            }
            return Ok(());
        }
        // Joining nodes whose metadata replica caught up start serving.
        for (&node, info) in &map.nodes {
            if info.state != NodeState::Joining || !learners.contains(&node) {
                continue;
            }
            if self.node_up(node) && caught_up.contains(&node) {
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
    /// Finish a joint membership.
    Flatten,
}

/// The next change that brings the metadata membership (voters and learners
/// by node) in line with the map, if any: learners first (a node must
/// follow before it can vote), then the voters, then removals. Voters are
/// kept on serving nodes, as many as `metadata_voters` and the serving
/// nodes allow, an odd number above two (a fourth voter adds no fault
/// tolerance; two are kept rather than one, for a second copy of the map),
/// and only nodes that are `ready` (up, caught up) are promoted.
fn metadata_change(
    map: &ClusterMap,
    voters: &BTreeSet<NodeId>,
    learners: &BTreeSet<NodeId>,
    ready: impl Fn(NodeId) -> bool,
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
    let mut wanted = (map.metadata_voters as usize).clamp(1, serving.len().max(1));
    // An even count above two adds no fault tolerance (4 -> 3); two voters
    // are kept rather than one, for a second copy of the map.
    if wanted.is_multiple_of(2) && wanted > 2 {
        wanted -= 1;
    }
    // Current voters on serving nodes stay, the ready ones first (a voter
    // that is down for a moment is not churned out while others could be).
    let mut staying: Vec<NodeId> = voters
        .iter()
        .copied()
        .filter(|node| serving.contains(node))
        .collect();
    staying.sort_by_key(|&node| (!ready(node), node));
    let mut next: BTreeSet<NodeId> = staying.into_iter().take(wanted).collect();
    for &node in &serving {
        if next.len() >= wanted {
            break;
        }
        if learners.contains(&node) && ready(node) {
            next.insert(node);
        }
    }
    // Never leave the group without a voter, nor shrink it below what it
    // has while the replacements are not ready (a voter set of an even
    // size is only a step on the way).
    let complete = next.len() == wanted || next.len() >= voters.len();
    if !next.is_empty() && next != *voters && complete {
        return Some(MetadataChange::Voters(next));
    }
    map.nodes
        .iter()
        .find(|(node, info)| {
            info.state == NodeState::Removed && learners.contains(node) && !voters.contains(node)
        })
        .map(|(&node, _)| MetadataChange::Remove(node))
}

impl Cluster {
    /// The scheduler's plan for `map` (nodes down for too long counted as
    /// gone).
    /// The replica planner's input beside the map: the nodes down too
    /// long, the shards to split and why, the nodes at their rate of moves
    /// (none `by_hand`: moves asked for by hand are not held to it).
    fn plan_inputs(
        &self,
        map: &ClusterMap,
        by_hand: bool,
    ) -> (
        BTreeSet<NodeId>,
        BTreeMap<GroupId, String>,
        BTreeSet<NodeId>,
    ) {
        let down = self.long_down_nodes(map);
        let splits = self.shards_to_split(map);
        let limited = if by_hand {
            BTreeSet::new()
        } else {
            self.operators.nodes_at_move_limit(
                std::time::Instant::now(),
                self.config.moves_per_node_per_minute_max,
            )
        };
        (down, splits, limited)
    }

    /// What [`super::scheduler::plan`] starts now on `map` (`by_hand`: see
    /// `plan_inputs`).
    pub(super) fn plan_for(
        &self,
        map: &ClusterMap,
        by_hand: bool,
    ) -> Vec<super::scheduler::Planned> {
        let (down, splits, limited) = self.plan_inputs(map, by_hand);
        super::scheduler::plan(
            map,
            &down,
            self.config.operators_max as usize,
            &splits,
            &self.shard_sizes(map),
            &limited,
            |shard| self.operator_backing_off(shard),
        )
    }
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
        let all_ready = |_| true;
        // One node, a second joins: it becomes a learner first.
        let map = map_with(&[(1, Serving), (2, Joining)], 3);
        assert_eq!(
            metadata_change(&map, &set(&[1]), &set(&[]), all_ready),
            Some(MetadataChange::AddLearner(2))
        );
        // A joining learner does not vote yet.
        assert_eq!(
            metadata_change(&map, &set(&[1]), &set(&[2]), all_ready),
            None
        );
        // Two serving nodes: two voters (a second copy of the map), once
        // the second is ready.
        let map = map_with(&[(1, Serving), (2, Serving)], 3);
        assert_eq!(
            metadata_change(&map, &set(&[1]), &set(&[2]), all_ready),
            Some(MetadataChange::Voters(set(&[1, 2])))
        );
        assert_eq!(
            metadata_change(&map, &set(&[1]), &set(&[2]), |n| n == 1),
            None
        );
        // Four serving nodes and five wanted: three voters.
        let map = map_with(&[(1, Serving), (2, Serving), (3, Serving), (4, Serving)], 5);
        assert_eq!(
            metadata_change(&map, &set(&[1, 2, 3]), &set(&[4]), all_ready),
            None
        );
        // Three: all vote, once they are ready.
        let map = map_with(&[(1, Serving), (2, Serving), (3, Serving), (4, Serving)], 3);
        assert_eq!(
            metadata_change(&map, &set(&[1]), &set(&[2, 3, 4]), |n| n != 3),
            Some(MetadataChange::Voters(set(&[1, 2, 4])))
        );
        assert_eq!(
            metadata_change(&map, &set(&[1]), &set(&[2, 3, 4]), |n| n == 1),
            None,
            "no promotion of learners that are not ready"
        );
        assert_eq!(
            metadata_change(&map, &set(&[1, 2, 3]), &set(&[4]), all_ready),
            None
        );
        // Draining node 1: its vote moves to node 4.
        let map = map_with(
            &[(1, Draining), (2, Serving), (3, Serving), (4, Serving)],
            3,
        );
        assert_eq!(
            metadata_change(&map, &set(&[1, 2, 3]), &set(&[4]), all_ready),
            Some(MetadataChange::Voters(set(&[2, 3, 4])))
        );
        // ... but not while node 4 is not ready: node 1 keeps voting.
        assert_eq!(
            metadata_change(&map, &set(&[1, 2, 3]), &set(&[4]), |n| n != 4),
            None
        );
        // Removed node 1, now a learner: removed from the group.
        let map = map_with(&[(1, Removed), (2, Serving), (3, Serving), (4, Serving)], 3);
        assert_eq!(
            metadata_change(&map, &set(&[2, 3, 4]), &set(&[1]), all_ready),
            Some(MetadataChange::Remove(1))
        );
        assert_eq!(
            metadata_change(&map, &set(&[2, 3, 4]), &set(&[]), all_ready),
            None
        );
    }
}
