//! Hibernation of idle Raft groups, resting on one liveness ping per node
//! pair.
//!
//! A node hosts many groups. If every group heartbeats, an idle node's CPU
//! grows with its group count (17 groups cost a quarter of a core in a
//! release build before this module). As in TiKV's hibernate regions, a
//! group whose leader has served no request for `cluster.hibernate_after_ms`,
//! with every replica caught up, stops ticking on every replica: openraft
//! then sends no heartbeats and runs no election timer, so a sleeping group
//! costs nothing. What keeps that safe is a ping from every node to every
//! peer each `cluster.liveness_interval_ms`, whatever the number of groups,
//! answered by a pong carrying the same news:
//!
//! - The leader lists the groups it put to sleep (term and last log index).
//!   A follower sleeps only while its leader's list is fresh (less than a
//!   liveness timeout old), names the group in the follower's own term, and
//!   is newer than the leader's last append; a follower whose log or apply
//!   position is behind the listed index sleeps too (so it does not call
//!   elections against a live leader) but asks, in its own ping, for the
//!   group to be woken. A group is listed only while its Raft core answered
//!   a check in the last few seconds, so a hung core stops being vouched
//!   for.
//! - While a group's leader is up and lists it, its replicas refuse votes
//!   and pre-votes (a hibernation lease): openraft's own leases have run out
//!   in a sleeping group, so without this any replica that woke for a wrong
//!   reason would win an election. A freshly started node refuses votes for
//!   one lease too (its lease did not survive the restart).
//! - A request on the leader (proposal, leader read, a follower's wake
//!   request) wakes the group there and sends a heartbeat at once; a
//!   successful append from the leader wakes a follower (after openraft has
//!   seen it, so its election timer starts fresh).
//! - A leader whose node has not been heard from for
//!   `cluster.liveness_timeout_ms` is replaced: its followers wake, and the
//!   first live voter in id order calls an election (pre-vote first) every
//!   round until one is held; the others wake half a timeout apart, so they
//!   do not split the vote. This also makes failover of busy groups faster
//!   than waiting for openraft's own timer (lease plus election timeout).
//! - Every group starts asleep (openraft's ticker off): a restarting node
//!   wakes a group as soon as the pings say so (no leader known: at once;
//!   leader gone: after a timeout), so a restart calls no election against
//!   sleeping leaders.
//!
//! Leader leases and read indexes are openraft's and unchanged: a sleeping
//! leader's lease has run out, so a read first gets a quorum's
//! acknowledgement, which wakes the followers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use parking_lot::Mutex;
use quiver_raft::{GroupId, NodeId, Raft, ReplicaId};

use super::wire::{Hibernating, PeerCall, PeerResult, Ping};
use super::{Cluster, Group};

/// A replica whose node has not been heard from for this many liveness
/// timeouts does not keep its group's leader awake: a node that is down for
/// good must not cost every group its sleep. It wakes the group when it
/// comes back and finds itself behind.
const MEMBER_DOWN_TIMEOUTS: u64 = 5;
/// How often a sleeping leader checks that its group's Raft core answers.
const CORE_CHECK_INTERVAL_MS: u64 = 3_000;
/// A sleeping group is listed in pings only if its core answered within
/// this long: a core that hangs stops being vouched for, and its followers
/// elect.
const CORE_CHECK_VALID_MS: u64 = 2 * CORE_CHECK_INTERVAL_MS;

/// One group's activity and sleep state on this node.
#[derive(Debug)]
pub struct Pulse {
    asleep: AtomicBool,
    /// When this node last served or proposed for the group (ms since the
    /// node started; 0 = never).
    active_ms: AtomicU64,
    /// When this node last received a successful append from the leader.
    leader_contact_ms: AtomicU64,
    /// The last term in which this node saw itself lead: winning an election
    /// counts as activity.
    led_term: AtomicU64,
    /// The leader's last log index when it went to sleep: an entry appended
    /// since (not through a request here) wakes it.
    slept_at_index: AtomicU64,
    /// When the leader last saw its core answer while asleep.
    core_checked_ms: AtomicU64,
    /// Whether a core check is under way.
    core_check_in_flight: AtomicBool,
    /// When this node found the group's leader missing (0 = it is not).
    leader_missing_ms: AtomicU64,
    /// When this node last called an election for a missing leader.
    elected_ms: AtomicU64,
    /// Serializes sleeping and waking, which must reach openraft in order.
    transition: Mutex<()>,
}

impl Pulse {
    /// A group's pulse at start: asleep, as openraft starts it with its
    /// ticker off (`Cluster::start`).
    pub fn asleep() -> Self {
        Self {
            asleep: AtomicBool::new(true),
            active_ms: AtomicU64::new(0),
            leader_contact_ms: AtomicU64::new(0),
            led_term: AtomicU64::new(0),
            slept_at_index: AtomicU64::new(0),
            core_checked_ms: AtomicU64::new(0),
            core_check_in_flight: AtomicBool::new(false),
            leader_missing_ms: AtomicU64::new(0),
            elected_ms: AtomicU64::new(0),
            transition: Mutex::new(()),
        }
    }

    /// Whether the group is asleep on this node.
    pub fn is_asleep(&self) -> bool {
        self.asleep.load(Ordering::SeqCst)
    }

    /// Records activity now; true if the group was asleep and has been woken.
    fn touch(&self, now_ms: u64, raft: &Raft) -> bool {
        self.active_ms.store(now_ms, Ordering::SeqCst);
        // SeqCst pairs with `sleep_if_idle`: either it sees this activity, or
        // this sees it asleep and wakes it.
        self.is_asleep() && self.wake(raft)
    }

    /// Puts a leader's group to sleep if it has been idle since
    /// `idle_before_ms`; true if it now sleeps.
    fn sleep_if_idle(
        &self,
        idle_before_ms: u64,
        now_ms: u64,
        last_index: u64,
        raft: &Raft,
    ) -> bool {
        let _transition = self.transition.lock();
        if self.is_asleep() {
            return true;
        }
        if self.active_ms.load(Ordering::SeqCst) > idle_before_ms {
            return false;
        }
        self.asleep.store(true, Ordering::SeqCst);
        if self.active_ms.load(Ordering::SeqCst) > idle_before_ms {
            // A request arrived meanwhile and did not see the flag.
            self.asleep.store(false, Ordering::SeqCst);
            return false;
        }
        self.slept_at_index.store(last_index, Ordering::SeqCst);
        // The metrics it decided on are current: the core answered.
        self.core_checked_ms.store(now_ms, Ordering::SeqCst);
        raft.runtime_config().tick(false);
        true
    }

    /// Puts a follower's group to sleep, unless an append from the leader
    /// arrived after `news_ms` (the leader woke since it said it sleeps).
    fn sleep_unless_contacted_since(&self, news_ms: u64, raft: &Raft) {
        let _transition = self.transition.lock();
        if self.is_asleep() || self.leader_contact_ms.load(Ordering::SeqCst) >= news_ms {
            return;
        }
        self.asleep.store(true, Ordering::SeqCst);
        raft.runtime_config().tick(false);
    }

    /// Wakes the group; true if it was asleep.
    pub(super) fn wake(&self, raft: &Raft) -> bool {
        let _transition = self.transition.lock();
        if !self.is_asleep() {
            return false;
        }
        self.asleep.store(false, Ordering::SeqCst);
        raft.runtime_config().tick(true);
        true
    }
}

/// What this node last heard from one peer.
#[derive(Debug, Default, Clone)]
struct PeerHeard {
    /// Last sign of life: a ping from it or its answer to ours (ms since
    /// start; 0 = never).
    heard_ms: u64,
    /// When its list of sleeping groups last arrived (in its ping or pong).
    news_ms: u64,
    /// The groups it said it put to sleep, by group.
    hibernating: Arc<HashMap<GroupId, Hibernating>>,
    /// Whether our ping to it is still unanswered (at most one in flight).
    ping_in_flight: bool,
    /// Whether it said it ships its log (as of `news_ms`).
    ships_log: bool,
}

/// What every peer last told this node, and what this node tells them.
#[derive(Debug, Default)]
pub struct Liveness {
    peers: Mutex<HashMap<NodeId, PeerHeard>>,
    /// The groups this node leads and has put to sleep, as of the last round
    /// (what its pongs say).
    mine: Mutex<Vec<Hibernating>>,
    /// Whether this node ships its log (what its pings and pongs say).
    ships_log: bool,
}

impl Liveness {
    /// What a node tells its peers, before it heard from any: whether it
    /// ships its log.
    pub fn new(ships_log: bool) -> Liveness {
        Liveness {
            ships_log,
            ..Liveness::default()
        }
    }

    fn record(&self, news: Ping, now_ms: u64) {
        let hibernating = news.hibernating.iter().map(|h| (h.group, *h)).collect();
        let mut peers = self.peers.lock();
        let heard = peers.entry(news.from).or_default();
        heard.heard_ms = heard.heard_ms.max(now_ms);
        heard.news_ms = now_ms;
        heard.hibernating = Arc::new(hibernating);
        heard.ships_log = news.ships_log;
    }

    fn snapshot(&self) -> HashMap<NodeId, PeerHeard> {
        self.peers.lock().clone()
    }

    /// Marks a ping to `peer` in flight; false if one already is.
    fn start_ping(&self, peer: NodeId) -> bool {
        let mut peers = self.peers.lock();
        let heard = peers.entry(peer).or_default();
        !std::mem::replace(&mut heard.ping_in_flight, true)
    }

    fn end_ping(&self, peer: NodeId) {
        if let Some(heard) = self.peers.lock().get_mut(&peer) {
            heard.ping_in_flight = false;
        }
    }

    /// Whether `peer` has been heard from within `timeout_ms` of `now_ms`.
    /// A peer never heard from counts as up for the first `timeout_ms`
    /// after this node started: it has not had the time to speak.
    pub(super) fn is_up(&self, peer: NodeId, now_ms: u64, timeout_ms: u64) -> bool {
        let heard_ms = self.peers.lock().get(&peer).map_or(0, |h| h.heard_ms);
        is_recent(heard_ms, now_ms, timeout_ms) || (heard_ms == 0 && now_ms < timeout_ms)
    }
}

/// Whether a moment `then_ms` (0 = never) is less than `within_ms` before
/// `now_ms`.
/// How often the stall watch ticks.
pub const STALL_TICK_MS: u64 = 100;
/// A tick this late means the process stood still (`SIGSTOP`, a VM pause,
/// a starved runtime).
pub const STALL_MS: u64 = 300;

/// Notices when this process stood still. Messages that reached the socket
/// meanwhile are stale when they are read (an append the leader sent before
/// a follower was stopped carries an old commit index, yet it would count
/// as fresh contact the moment it arrives), so after a stall a replica's
/// own state is not trusted for `REPLICA` reads until every contact it
/// could have stamped from such messages has aged out
/// (`election_timeout_max_ms`); meanwhile they go to the leader.
#[derive(Debug, Default)]
pub struct StallWatch {
    last_tick_ms: AtomicU64,
    /// The last stall: when it was noticed, and how long it lasted (at
    /// most: the gap between two ticks).
    stalled_ms: AtomicU64,
    stall_len_ms: AtomicU64,
}

impl StallWatch {
    /// A tick at `now_ms`.
    pub fn tick(&self, now_ms: u64) {
        let last = self.last_tick_ms.swap(now_ms, Ordering::SeqCst);
        let gap = now_ms.saturating_sub(last);
        if last > 0 && gap > STALL_MS {
            self.stall_len_ms.store(gap, Ordering::SeqCst);
            self.stalled_ms.store(now_ms, Ordering::SeqCst);
        }
    }

    /// How recent a contact stamp must be at `now_ms` for a read that
    /// accepts contact within `window_ms`, or `None` if this replica's state
    /// is not to be trusted now: while the watch has not ticked lately (a
    /// stall under way unnoticed, as right after a `SIGCONT`), and for
    /// `block_ms` (the lease) after a stall, as for every `REPLICA` read.
    /// A larger window is then still within reach of stamps made from
    /// messages that waited in the socket, up to the stall's length L too
    /// young: until `window_ms` after the stall it shrinks by L.
    pub fn window(&self, now_ms: u64, window_ms: u64, block_ms: u64) -> Option<u64> {
        let last = self.last_tick_ms.load(Ordering::SeqCst);
        if last == 0 || now_ms.saturating_sub(last) > STALL_MS {
            return None;
        }
        let stalled = self.stalled_ms.load(Ordering::SeqCst);
        if stalled == 0 || now_ms >= stalled.saturating_add(window_ms.max(block_ms)) {
            return Some(window_ms);
        }
        if now_ms < stalled.saturating_add(block_ms) {
            return None;
        }
        window_ms
            .checked_sub(self.stall_len_ms.load(Ordering::SeqCst))
            .filter(|&w| w > 0)
    }
}

fn is_recent(then_ms: u64, now_ms: u64, within_ms: u64) -> bool {
    then_ms > 0 && now_ms.saturating_sub(then_ms) < within_ms
}

/// The fields of a group's Raft metrics that hibernation decides on, copied
/// under the watch borrow. Only scalars: a round looks at every group five
/// times a second, so membership and replication progress are read only
/// when they matter.
struct GroupView {
    state: ServerState,
    leader: Option<NodeId>,
    term: u64,
    last_index: Option<u64>,
    applied_index: Option<u64>,
    committed_index: Option<u64>,
}

impl GroupView {
    fn of(raft: &Raft) -> GroupView {
        let metrics = raft.metrics();
        let m = metrics.borrow_watched();
        GroupView {
            state: m.state,
            leader: m.current_leader.map(ReplicaId::node),
            term: m.current_term,
            last_index: m.last_log_index,
            applied_index: m.last_applied.map(|id| id.index),
            committed_index: m.local_committed.map(|id| id.index),
        }
    }
}

/// The nodes of the group's voters, in replica id order (a group has at
/// most one replica per node).
fn voters(raft: &Raft) -> Vec<NodeId> {
    raft.metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .voter_ids()
        .map(ReplicaId::node)
        .collect()
}

/// Which of the group's live followers this node is, for a missing leader:
/// 0 calls the election at once, the others wait their turn.
fn election_rank(
    voters: &[NodeId],
    missing_leader: NodeId,
    me: NodeId,
    is_up: impl Fn(NodeId) -> bool,
) -> Option<u64> {
    voters
        .iter()
        .filter(|&&voter| voter != missing_leader && (voter == me || is_up(voter)))
        .position(|&voter| voter == me)
        .map(|rank| rank as u64)
}

impl Cluster {
    /// Milliseconds since this node started (never 0).
    pub(super) fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    /// A request for `group` arrived here and this node leads it (a
    /// proposal, a leader read, a follower's wake request): the group stays
    /// awake, and if it was asleep, it wakes and heartbeats at once so its
    /// followers wake too. On a follower this does nothing: its sleep is its
    /// leader's to decide, and waking it could only start an election.
    pub(super) async fn activity(&self, group: GroupId) {
        let Some(hosted) = self.host.get(group) else {
            return;
        };
        if hosted.raft.metrics().borrow_watched().state != ServerState::Leader {
            return;
        }
        if hosted.pulse.touch(self.now_ms(), &hosted.raft)
            && let Err(e) = hosted.raft.trigger().heartbeat().await
        {
            tracing::warn!(group, error = %e, "heartbeat after waking");
        }
    }

    /// The group's leader sent this node an append that openraft accepted
    /// as from its leader: the replica may tick again (its election timer
    /// was just restarted by the append).
    pub fn leader_contact(&self, group: GroupId) {
        let Some(hosted) = self.host.get(group) else {
            return;
        };
        hosted
            .pulse
            .leader_contact_ms
            .store(self.now_ms(), Ordering::SeqCst);
        hosted.pulse.wake(&hosted.raft);
    }

    /// Why this replica refuses a vote or pre-vote request now, if it does:
    /// it just started (openraft's lease did not survive the restart), or
    /// its group sleeps under a leader that is up and vouches for it (the
    /// hibernation lease). A leader transfer is the leader's own wish and
    /// always goes through.
    pub fn vote_refusal(&self, group: GroupId, leadership_transfer: bool) -> Option<String> {
        if leadership_transfer {
            return None;
        }
        let now = self.now_ms();
        if now < self.config.election_timeout_max_ms {
            return Some("refusing votes for one lease after a restart".into());
        }
        let hosted = self.host.get(group)?;
        let view = GroupView::of(&hosted.raft);
        let timeout = self.config.liveness_timeout_ms;
        match view.state {
            // A leader that started a handover vouches for nothing.
            ServerState::Leader if hosted.handed_over_in(view.term) => None,
            ServerState::Leader if hosted.pulse.is_asleep() => {
                let vouched = is_recent(
                    hosted.pulse.core_checked_ms.load(Ordering::SeqCst),
                    now,
                    CORE_CHECK_VALID_MS,
                );
                vouched.then(|| "the leader is up; the group only sleeps".into())
            }
            ServerState::Follower | ServerState::Learner => {
                let leader = view.leader.filter(|&leader| leader != self.node_id)?;
                let peers = self.liveness.peers.lock();
                let heard = peers.get(&leader)?;
                let vouched = is_recent(heard.heard_ms, now, timeout)
                    && is_recent(heard.news_ms, now, timeout)
                    && heard
                        .hibernating
                        .get(&group)
                        .is_some_and(|asleep| asleep.term == view.term);
                vouched.then(|| format!("leader {leader} is up and the group only sleeps"))
            }
            _ => None,
        }
    }

    /// Whether a follower's replica is fresh enough for a `REPLICA` read at
    /// `applied_index`: it heard from its leader within `within_ms`, or the
    /// leader's fresh news says the group sleeps at an index this replica
    /// is within `cluster.replica_lag_entries_max` of. (A replica cut off
    /// from its leader keeps its old commit index and would otherwise look
    /// fresh forever.)
    pub(super) fn replica_fresh(
        &self,
        group: GroupId,
        leader: Option<NodeId>,
        applied_index: u64,
        within_ms: u64,
    ) -> bool {
        let Some(hosted) = self.host.get(group) else {
            return false;
        };
        let now = self.now_ms();
        let Some(within_ms) =
            self.stall
                .window(now, within_ms, self.config.election_timeout_max_ms)
        else {
            return false;
        };
        if is_recent(
            hosted.pulse.leader_contact_ms.load(Ordering::SeqCst),
            now,
            within_ms,
        ) {
            return true;
        }
        let Some(leader) = leader else {
            return false;
        };
        let timeout = self.config.liveness_timeout_ms;
        let peers = self.liveness.peers.lock();
        peers.get(&leader).is_some_and(|heard| {
            is_recent(heard.news_ms, now, timeout)
                && heard.hibernating.get(&group).is_some_and(|asleep| {
                    applied_index.saturating_add(self.config.replica_lag_entries_max)
                        >= asleep.last_index
                })
        })
    }

    /// A peer's ping: record what it says, wake the groups it asks for, and
    /// answer with this node's own news.
    pub async fn on_ping(&self, ping: Ping) -> Ping {
        let wake = ping.wake.clone();
        self.loads.record(
            ping.from,
            &ping.loads,
            self.now_ms(),
            self.load_reports_fresh_ms(),
        );
        self.liveness.record(ping, self.now_ms());
        for group in wake {
            self.activity(group).await;
        }
        Ping {
            from: self.node_id,
            hibernating: self.liveness.mine.lock().clone(),
            wake: Vec::new(),
            // Loads travel in pings only: each peer pings this node too.
            loads: Vec::new(),
            ships_log: self.liveness.ships_log,
        }
    }

    /// Whether a peer ships its log, as the peers last said: `Some(false)`
    /// only if every other node of the cluster answered within the
    /// liveness timeout and none ships; `None` if one is not heard from
    /// (it may ship).
    pub fn a_peer_ships_log(&self) -> Option<bool> {
        let now = self.now_ms();
        let timeout = self.config.liveness_timeout_ms;
        let peers = self.liveness.peers.lock();
        let mut unheard = false;
        for peer in self.clients.nodes() {
            if peer == self.node_id {
                continue;
            }
            match peers.get(&peer) {
                Some(heard) if is_recent(heard.news_ms, now, timeout) => {
                    if heard.ships_log {
                        return Some(true);
                    }
                }
                _ => unheard = true,
            }
        }
        (!unheard).then_some(false)
    }

    /// One liveness round: sleep or wake each hosted group as the rules in
    /// the module doc say, then ping every peer.
    pub(super) fn liveness_round(self: &Arc<Self>) {
        let now = self.now_ms();
        self.start_measuring_loads(now);
        let peers = self.liveness.snapshot();
        let mut hibernating = Vec::new();
        let mut wake: BTreeMap<NodeId, Vec<GroupId>> = BTreeMap::new();
        for (group, hosted) in self.host.all() {
            let hosted = &*hosted;
            let view = GroupView::of(&hosted.raft);
            match view.state {
                ServerState::Leader => {
                    hosted.pulse.leader_missing_ms.store(0, Ordering::SeqCst);
                    if let Some(asleep) = self.lead(group, hosted, &view, now) {
                        hibernating.push(asleep);
                    }
                }
                ServerState::Follower | ServerState::Learner => {
                    if let Some(leader) = self.follow(group, hosted, &view, &peers, now) {
                        wake.entry(leader).or_default().push(group);
                    }
                }
                // An election under way needs the timer to retry if it fails.
                ServerState::Candidate => {
                    hosted.pulse.wake(&hosted.raft);
                }
                ServerState::Shutdown => {}
            }
        }
        *self.liveness.mine.lock() = hibernating.clone();
        for peer in self.clients.nodes() {
            if peer == self.node_id || !self.liveness.start_ping(peer) {
                continue;
            }
            let mut outgoing = self.loads.outgoing(peer);
            let ping = Ping {
                from: self.node_id,
                hibernating: hibernating.clone(),
                wake: wake.remove(&peer).unwrap_or_default(),
                loads: std::mem::take(&mut outgoing.loads),
                ships_log: self.liveness.ships_log,
            };
            let cluster = Arc::downgrade(self);
            let timeout = Duration::from_millis(self.config.liveness_timeout_ms);
            let clients = self.clients.clone();
            tokio::spawn(async move {
                let answer = clients
                    .call_with_timeout(peer, 0, None, &PeerCall::Ping(ping), timeout)
                    .await;
                let Some(cluster) = cluster.upgrade() else {
                    return;
                };
                if let Ok(PeerResult::Pong(news)) = answer
                    && news.from == peer
                {
                    cluster.loads.delivered(peer, &outgoing);
                    cluster.liveness.record(news, cluster.now_ms());
                }
                cluster.liveness.end_ping(peer);
            });
        }
    }

    /// The leader's side: sleep when idle and quiescent, wake when entries
    /// arrived without a request here, keep checking a sleeping core.
    /// Returns the group's entry for the pings while it sleeps and its core
    /// answers.
    fn lead(
        self: &Arc<Self>,
        group: GroupId,
        hosted: &Group,
        view: &GroupView,
        now: u64,
    ) -> Option<Hibernating> {
        let pulse = &hosted.pulse;
        let after = self.config.hibernate_after_ms;
        let last_index = view.last_index?;
        if pulse.led_term.swap(view.term, Ordering::SeqCst) != view.term {
            pulse.touch(now, &hosted.raft);
        }
        if hosted.handed_over_in(view.term) {
            // A leader that started a handover sends no heartbeats and
            // takes no writes: if the handover failed, the group must stay
            // awake so that its voters elect a leader, not sleep under this
            // one.
            pulse.touch(now, &hosted.raft);
            return None;
        }
        if pulse.is_asleep() && pulse.slept_at_index.load(Ordering::SeqCst) != last_index {
            // Entries appended without a request through this node (a
            // membership change, say): back to heartbeats until quiet.
            pulse.touch(now, &hosted.raft);
        }
        let idle_before = now.saturating_sub(after);
        let asleep = if pulse.is_asleep() {
            true
        } else {
            after > 0
                && pulse.active_ms.load(Ordering::SeqCst) <= idle_before
                && self.quiescent(hosted, view, now)
                && pulse.sleep_if_idle(idle_before, now, last_index, &hosted.raft)
        };
        if !asleep {
            return None;
        }
        self.check_core(group, hosted, now);
        is_recent(
            pulse.core_checked_ms.load(Ordering::SeqCst),
            now,
            CORE_CHECK_VALID_MS,
        )
        .then_some(Hibernating {
            group,
            term: view.term,
            last_index,
        })
    }

    /// Every few seconds, asks a sleeping group's Raft core to answer (a
    /// round trip through its event loop): the metrics a sleeping leader
    /// publishes would look the same if the core had hung.
    fn check_core(self: &Arc<Self>, group: GroupId, hosted: &Group, now: u64) {
        let pulse = &hosted.pulse;
        if is_recent(
            pulse.core_checked_ms.load(Ordering::SeqCst),
            now,
            CORE_CHECK_INTERVAL_MS,
        ) || pulse.core_check_in_flight.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let raft = hosted.raft.clone();
        let timeout = Duration::from_millis(self.config.liveness_timeout_ms);
        let cluster = Arc::downgrade(self);
        tokio::spawn(async move {
            let answered = tokio::time::timeout(timeout, raft.with_raft_state(|_| ())).await;
            let Some(cluster) = cluster.upgrade() else {
                return;
            };
            let Some(hosted) = cluster.host.get(group) else {
                return;
            };
            if matches!(answered, Ok(Ok(()))) {
                hosted
                    .pulse
                    .core_checked_ms
                    .store(cluster.now_ms(), Ordering::SeqCst);
            } else {
                tracing::warn!(group, "a sleeping group's Raft core did not answer");
            }
            hosted
                .pulse
                .core_check_in_flight
                .store(false, Ordering::SeqCst);
        });
    }

    /// Whether nothing is in flight in a group this node leads: everything
    /// committed and applied, every replica that is up has every entry, no
    /// membership change under way.
    fn quiescent(&self, hosted: &Group, view: &GroupView, now: u64) -> bool {
        let Some(last) = view.last_index else {
            return false;
        };
        if view.applied_index != Some(last) || view.committed_index != Some(last) {
            return false;
        }
        let (members, matched): (Vec<NodeId>, BTreeMap<NodeId, Option<u64>>) = {
            let metrics = hosted.raft.metrics();
            let m = metrics.borrow_watched();
            let membership = m.membership_config.membership();
            if membership.get_joint_config().len() > 1 {
                return false;
            }
            let mut members: Vec<NodeId> = membership.voter_ids().map(ReplicaId::node).collect();
            members.extend(membership.learner_ids().map(ReplicaId::node));
            let matched = m
                .replication
                .as_ref()
                .map(|replication| {
                    replication
                        .iter()
                        .map(|(id, matched)| (id.node(), matched.map(|l| l.index)))
                        .collect()
                })
                .unwrap_or_default();
            (members, matched)
        };
        let down_after = self.config.liveness_timeout_ms * MEMBER_DOWN_TIMEOUTS;
        members
            .iter()
            .filter(|&&member| member != self.node_id)
            .all(|member| {
                matched.get(member).copied().flatten() == Some(last)
                    || !self.liveness.is_up(*member, now, down_after)
            })
    }

    /// A follower's or learner's side: follow the leader's sleep, or wake
    /// and elect when the leader is gone. Returns the leader to ask for a
    /// wake-up when this replica sleeps but is behind.
    fn follow(
        &self,
        group: GroupId,
        hosted: &Group,
        view: &GroupView,
        peers: &HashMap<NodeId, PeerHeard>,
        now: u64,
    ) -> Option<NodeId> {
        let pulse = &hosted.pulse;
        let timeout = self.config.liveness_timeout_ms;
        let Some(leader) = view.leader.filter(|&leader| leader != self.node_id) else {
            // No leader known (a replica that came back empty, or whose last
            // election did not finish). If a peer says it leads the group
            // and sleeps, ask it to wake: its appends will tell us it leads.
            // Otherwise an election is due, and needs the timer.
            let sleeping_leader = peers.iter().find_map(|(&peer, heard)| {
                (is_recent(heard.news_ms, now, timeout) && heard.hibernating.contains_key(&group))
                    .then_some((peer, heard.news_ms))
            });
            return match sleeping_leader {
                Some((peer, news_ms)) => {
                    pulse.sleep_unless_contacted_since(news_ms, &hosted.raft);
                    Some(peer)
                }
                None => {
                    pulse.wake(&hosted.raft);
                    None
                }
            };
        };
        let heard = peers.get(&leader);
        if heard.is_some_and(|h| is_recent(h.heard_ms, now, timeout)) {
            pulse.leader_missing_ms.store(0, Ordering::SeqCst);
            let heard = heard?;
            if !is_recent(heard.news_ms, now, timeout) {
                // Alive, but no current news of its sleep: keep as we are.
                return None;
            }
            return match heard.hibernating.get(&group) {
                Some(asleep) if asleep.term == view.term => {
                    pulse.sleep_unless_contacted_since(heard.news_ms, &hosted.raft);
                    let caught_up = view.last_index == Some(asleep.last_index)
                        && view.applied_index == Some(asleep.last_index);
                    (!caught_up).then_some(leader)
                }
                // It sleeps in another term than ours: we missed something.
                Some(_) => Some(leader),
                None => {
                    // The leader is awake: its heartbeats are due here.
                    pulse.wake(&hosted.raft);
                    None
                }
            };
        }
        if now < timeout {
            // Just started: peers have not had time to speak yet.
            return None;
        }
        let missing_since = match pulse.leader_missing_ms.load(Ordering::SeqCst) {
            0 => {
                pulse.leader_missing_ms.store(now, Ordering::SeqCst);
                tracing::info!(group, leader, "leader's node not heard from; replacing it");
                now
            }
            since => since,
        };
        let voters = voters(&hosted.raft);
        let rank = election_rank(&voters, leader, self.node_id, |voter| {
            peers
                .get(&voter)
                .is_some_and(|h| is_recent(h.heard_ms, now, timeout))
        });
        match rank {
            Some(rank) => {
                if now.saturating_sub(missing_since) < rank * (timeout / 2) {
                    return None;
                }
                pulse.wake(&hosted.raft);
                // The first live voter calls an election every round until
                // one is under way (a pre-vote refused because this node's
                // own lease had not quite run out must not be the last try).
                let interval = self.config.liveness_interval_ms;
                if rank == 0 && !is_recent(pulse.elected_ms.load(Ordering::SeqCst), now, interval) {
                    pulse.elected_ms.store(now, Ordering::SeqCst);
                    let raft = hosted.raft.clone();
                    tokio::spawn(async move {
                        // Pre-vote: refused while a quorum still hears the leader.
                        if let Err(e) = raft.trigger().elect(true).await {
                            tracing::warn!(group, error = %e, "calling an election");
                        }
                    });
                }
            }
            // A learner: the next leader's appends will reach it.
            None => {
                pulse.wake(&hosted.raft);
            }
        }
        None
    }
}

/// Calls `f` every `interval` until the cluster is dropped or stops.
async fn every(cluster: std::sync::Weak<Cluster>, interval: Duration, f: impl Fn(&Arc<Cluster>)) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        if cluster.stopping.load(Ordering::SeqCst) {
            return;
        }
        f(&cluster);
    }
}

/// Runs a liveness round every `cluster.liveness_interval_ms` until the
/// cluster is dropped.
pub(super) async fn liveness_loop(cluster: std::sync::Weak<Cluster>, interval: Duration) {
    every(cluster, interval, |cluster| cluster.liveness_round()).await;
}

/// Ticks the stall watch until the cluster is dropped.
pub(super) async fn stall_loop(cluster: std::sync::Weak<Cluster>) {
    every(cluster, Duration::from_millis(STALL_TICK_MS), |cluster| {
        cluster.stall.tick(cluster.now_ms());
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_blocks_replica_reads_until_stale_contacts_age_out() {
        let watch = StallWatch::default();
        assert_eq!(
            watch.window(50, 1_000, 1_000),
            None,
            "not before the first tick"
        );
        watch.tick(100);
        assert_eq!(watch.window(150, 1_000, 1_000), Some(1_000));
        watch.tick(200);
        // Stopped from 200 to 2,000: before the watch runs again, the late
        // tick itself says so.
        assert_eq!(watch.window(2_000, 1_000, 1_000), None);
        watch.tick(2_000);
        assert_eq!(
            watch.window(2_050, 1_000, 1_000),
            None,
            "blocked after the stall"
        );
        for now in (2_100..3_000).step_by(100) {
            watch.tick(now);
            assert_eq!(watch.window(now, 1_000, 1_000), None);
        }
        watch.tick(3_000);
        assert_eq!(
            watch.window(3_000, 1_000, 1_000),
            Some(1_000),
            "contacts aged out"
        );
        // A read accepting older contact (a caller's staleness budget):
        // blocked for the lease as every read, then until its whole window
        // after the stall has passed, the window shrinks by the stall's
        // length (1.8 s), since a stamp may be that much too young.
        assert_eq!(watch.window(2_500, 10_000, 1_000), None);
        assert_eq!(watch.window(3_000, 10_000, 1_000), Some(8_200));
        for now in (3_100..12_000).step_by(100) {
            watch.tick(now);
        }
        assert_eq!(watch.window(12_000, 10_000, 1_000), Some(10_000));
    }

    #[test]
    fn the_first_live_voter_calls_the_election() {
        let all_up = |_| true;
        assert_eq!(election_rank(&[1, 2, 3], 1, 2, all_up), Some(0));
        assert_eq!(election_rank(&[1, 2, 3], 1, 3, all_up), Some(1));
        assert_eq!(election_rank(&[1, 2, 3], 2, 1, all_up), Some(0));
        assert_eq!(election_rank(&[1, 2, 3], 2, 3, all_up), Some(1));
        assert_eq!(election_rank(&[1, 2, 3], 1, 4, all_up), None, "a learner");
        // Voters that are down do not hold a rank.
        let two_down = |voter| voter != 2;
        assert_eq!(election_rank(&[1, 2, 3, 4, 5], 1, 3, two_down), Some(0));
        assert_eq!(election_rank(&[1, 2, 3, 4, 5], 1, 5, two_down), Some(2));
    }

    #[test]
    fn recent_means_heard_and_within_the_window() {
        assert!(!is_recent(0, 100, 1_000), "never");
        assert!(is_recent(50, 100, 1_000));
        assert!(!is_recent(50, 1_050, 1_000));
        assert!(
            is_recent(1_060, 1_050, 1_000),
            "a clock read in another order"
        );
    }
}
