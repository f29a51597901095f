//! Shard load reports, for splits by size and by load.
//!
//! Every `cluster.load_report_interval_ms` each node measures the shards it
//! leads: the bytes of the shard's own key range (RocksDB's approximate
//! size of the table files over that range, plus the memtables: after a
//! split both halves share table files until compaction, so a range is what
//! says how big each half is) and the rows written per second since the
//! last measurement. The liveness pings, which every node sends every peer
//! anyway, carry the reports, so the metadata leader knows every shard's
//! load without asking: each peer is sent each measurement once (at most
//! [`LOAD_REPORTS_PER_PING_MAX`] reports per ping, the rest in the next
//! pings), so an idle ping stays small. A report names the shard's range
//! version, and one made before the shard's last split is ignored. The
//! measurement runs on a blocking thread, never on the liveness loop (it
//! asks RocksDB for sizes), and asks for sizes only when splits by size
//! are on. The scheduler splits a
//! shard whose report exceeds `cluster.split_shard_bytes_max` or
//! `cluster.split_shard_write_rows_per_second_max` (0: never).
//!
//! A report also says who leads the shard, and in which term: the leader
//! balancer ([`super::scheduler::plan_leader`]) counts leaders from it. Of
//! two reports for a shard the one of the higher term wins (a deposed
//! leader that has not heard of its successor keeps reporting), and a
//! handover the balancer made counts as a report of its new term.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use parking_lot::Mutex;
use quiver_raft::cluster_map::ClusterMap;
use quiver_raft::{GroupId, NodeId};
use serde::{Deserialize, Serialize};

use super::Cluster;

/// Most load reports one ping carries (a measurement of more shards goes
/// out over several pings).
pub const LOAD_REPORTS_PER_PING_MAX: usize = 1024;

/// The narrowest hash range the scheduler splits (2^48 of the 2^64 hashes:
/// at most 16 halvings of the whole ring). Splitting by write rate cannot
/// spread one hot key, and without a floor every split would move that key
/// into a smaller child that is just as hot.
pub const SPLIT_RANGE_WIDTH_MIN: u128 = 1 << 48;

/// One shard's load, as its leader measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLoad {
    /// The shard.
    pub group: GroupId,
    /// Its range version when measured (reports from before a split are
    /// stale).
    pub version: u64,
    /// Approximate bytes of its rows.
    pub bytes: u64,
    /// Rows written per second over the last interval.
    pub write_rows_per_second: u64,
    /// The reporting leader's term.
    pub term: u64,
}

/// A report as received.
#[derive(Debug, Clone, Copy)]
struct Report {
    load: ShardLoad,
    /// The node that sent it (the shard's leader in `load.term`).
    leader: NodeId,
    /// When it arrived (ms since start).
    at_ms: u64,
}

/// What this node knows of shard loads.
#[derive(Debug, Default)]
pub struct Loads {
    /// The report of the highest term per shard.
    reported: Mutex<HashMap<GroupId, Report>>,
    /// This node's latest measurement and its sequence number.
    mine: Mutex<(u64, Arc<Vec<ShardLoad>>)>,
    /// Per peer, the measurement and how many of its reports it was sent.
    delivered: Mutex<HashMap<NodeId, (u64, usize)>>,
    /// When this node last measured, and each led shard's row counter then.
    samples: Mutex<(u64, HashMap<GroupId, u64>)>,
    /// A measurement is running (on a blocking thread).
    measuring: AtomicBool,
}

/// The reports one ping to a peer carries, and what to remember once the
/// peer has them.
#[derive(Debug, Default)]
pub struct Outgoing {
    /// The reports.
    pub loads: Vec<ShardLoad>,
    /// The measurement they belong to.
    seq: u64,
    /// How many of its reports the peer has after this ping.
    upto: usize,
}

impl Loads {
    /// Replaces this node's reports with a new measurement.
    fn set_mine(&self, loads: Vec<ShardLoad>) {
        let mut mine = self.mine.lock();
        *mine = (mine.0 + 1, Arc::new(loads));
    }

    /// What the next ping to `peer` carries: the part of the latest
    /// measurement it has not been sent yet (empty once it has all).
    pub fn outgoing(&self, peer: NodeId) -> Outgoing {
        let (seq, loads) = self.mine.lock().clone();
        let from = match self.delivered.lock().get(&peer) {
            Some(&(sent, upto)) if sent == seq => upto,
            _ => 0,
        };
        let upto = loads
            .len()
            .min(from.saturating_add(LOAD_REPORTS_PER_PING_MAX));
        Outgoing {
            loads: loads.get(from..upto).unwrap_or_default().to_vec(),
            seq,
            upto,
        }
    }

    /// `peer` answered a ping that carried `sent`.
    pub fn delivered(&self, peer: NodeId, sent: &Outgoing) {
        let mut delivered = self.delivered.lock();
        let known = delivered.entry(peer).or_default();
        if known.0 < sent.seq || (known.0 == sent.seq && known.1 < sent.upto) {
            *known = (sent.seq, sent.upto);
        }
    }

    /// Records `leader`'s reports, arrived at `now_ms`; one of a lower
    /// term than the shard's last report is kept only once that one is
    /// older than `stale_after_ms`.
    pub fn record(&self, leader: NodeId, reports: &[ShardLoad], now_ms: u64, stale_after_ms: u64) {
        let mut reported = self.reported.lock();
        for load in reports.iter().take(LOAD_REPORTS_PER_PING_MAX) {
            let report = Report {
                load: *load,
                leader,
                at_ms: now_ms,
            };
            match reported.get_mut(&load.group) {
                Some(known)
                    if known.load.term > load.term
                        && now_ms.saturating_sub(known.at_ms) <= stale_after_ms => {}
                Some(known) => *known = report,
                None => {
                    reported.insert(load.group, report);
                }
            }
        }
    }

    /// `group`'s leadership moved to `leader` in `term` (a handover this
    /// node made): counted at once, before that leader's next report.
    pub fn handed_over(&self, group: GroupId, leader: NodeId, term: u64, now_ms: u64) {
        if let Some(known) = self.reported.lock().get_mut(&group)
            && known.load.term <= term
        {
            known.leader = leader;
            known.load.term = term;
            known.at_ms = now_ms;
        }
    }

    /// Who leads each shard as of reports that arrived at most
    /// `fresh_ms` before `now_ms`.
    pub fn leaders(&self, now_ms: u64, fresh_ms: u64) -> BTreeMap<GroupId, NodeId> {
        self.reported
            .lock()
            .iter()
            .filter(|(_, report)| now_ms.saturating_sub(report.at_ms) <= fresh_ms)
            .map(|(&group, report)| (group, report.leader))
            .collect()
    }
}

impl Cluster {
    /// Starts a measurement of the shards this node leads on a blocking
    /// thread, if an interval has passed since the last one and none is
    /// running (called every liveness round).
    pub(super) fn start_measuring_loads(self: &Arc<Self>, now_ms: u64) {
        let due = {
            let samples = self.loads.samples.lock();
            samples.0 == 0
                || now_ms.saturating_sub(samples.0) >= self.config.load_report_interval_ms
        };
        if !due || self.loads.measuring.swap(true, Ordering::AcqRel) {
            return;
        }
        let cluster = self.clone();
        tokio::task::spawn_blocking(move || {
            cluster.measure_loads(now_ms);
            cluster.loads.measuring.store(false, Ordering::Release);
        });
    }

    /// Measures the shards this node leads.
    fn measure_loads(&self, now_ms: u64) {
        let (elapsed_ms, previous) = {
            let samples = self.loads.samples.lock();
            (now_ms.saturating_sub(samples.0), samples.1.clone())
        };
        // Sizes cost RocksDB work per shard: asked for only when they can
        // trigger a split or a size move.
        let measure_bytes =
            self.config.split_shard_bytes_max > 0 || self.config.balance_size_gap_bytes_min > 0;
        let placement = self.placement();
        let mut mine = Vec::new();
        let mut counters = HashMap::new();
        for (group, hosted) in self.host.all() {
            let (state, term) = {
                let metrics = hosted.raft.metrics();
                let m = metrics.borrow_watched();
                (m.state, m.current_term)
            };
            if group == quiver_raft::METADATA_GROUP || state != ServerState::Leader {
                continue;
            }
            let Some(desc) = placement.shard(group) else {
                continue;
            };
            // The shard's own range decides which rows are its own (after a
            // split its store holds the other half's files until compaction).
            let (start, end, version) = match hosted.state.range() {
                Some(range) => (range.start, range.end, range.version),
                None => (desc.start, desc.end, 0),
            };
            let store = hosted.state.store();
            let rows = store.stats().rows_written;
            counters.insert(group, rows);
            let rate = match previous.get(&group) {
                Some(&before) if elapsed_ms > 0 && rows >= before => {
                    (rows - before).saturating_mul(1000) / elapsed_ms
                }
                _ => 0,
            };
            mine.push(ShardLoad {
                group,
                version,
                bytes: if measure_bytes {
                    store.approximate_bytes(start, end)
                } else {
                    0
                },
                write_rows_per_second: rate,
                term,
            });
        }
        self.loads
            .record(self.node_id, &mine, now_ms, self.load_reports_fresh_ms());
        self.loads.set_mine(mine);
        *self.loads.samples.lock() = (now_ms, counters);
    }

    /// How long a shard's load report counts: three report intervals (a
    /// leader that stops reporting is dead or deposed by then).
    pub(super) fn load_reports_fresh_ms(&self) -> u64 {
        self.config.load_report_interval_ms.saturating_mul(3)
    }

    /// The shards the scheduler should split now and why: a fresh report
    /// (of the shard's current range version, at most three intervals old)
    /// over a limit.
    pub(super) fn shards_to_split(&self, map: &ClusterMap) -> BTreeMap<GroupId, String> {
        let limits = SplitLimits {
            bytes_max: self.config.split_shard_bytes_max,
            write_rows_per_second_max: self.config.split_shard_write_rows_per_second_max,
        };
        self.loads
            .over_split_limits(map, limits, self.now_ms(), self.load_reports_fresh_ms())
    }
}

impl Cluster {
    /// Each shard's size by its fresh report of its current range version,
    /// with the size balancing tolerance: the scheduler's size input.
    pub(super) fn shard_sizes(&self, map: &ClusterMap) -> super::scheduler::Sizes {
        super::scheduler::Sizes {
            bytes: self
                .loads
                .sizes(map, self.now_ms(), self.load_reports_fresh_ms()),
            gap_bytes_min: self.config.balance_size_gap_bytes_min,
        }
    }
}

impl Loads {
    /// The bytes of each shard of `map` whose report is of its current
    /// range version and at most `fresh_ms` old at `now`.
    fn sizes(&self, map: &ClusterMap, now: u64, fresh_ms: u64) -> BTreeMap<GroupId, u64> {
        self.reported
            .lock()
            .iter()
            .filter(|(group, report)| {
                now.saturating_sub(report.at_ms) <= fresh_ms
                    && map
                        .shards
                        .get(group)
                        .is_some_and(|desc| desc.epoch.version == report.load.version)
            })
            .map(|(&group, report)| (group, report.load.bytes))
            .collect()
    }
}

/// When a shard splits by itself (0: never by that measure).
#[derive(Debug, Clone, Copy)]
pub struct SplitLimits {
    /// `cluster.split_shard_bytes_max`.
    pub bytes_max: u64,
    /// `cluster.split_shard_write_rows_per_second_max` (a rate over one
    /// load report interval, so a burst shorter than that weighs less).
    pub write_rows_per_second_max: u64,
}

impl Loads {
    /// The shards of `map` whose fresh report (of the shard's current range
    /// version, at most `fresh_ms` old at `now_ms`) is over `limits`, with
    /// why; never a shard too narrow to split again.
    fn over_split_limits(
        &self,
        map: &ClusterMap,
        limits: SplitLimits,
        now: u64,
        fresh_ms: u64,
    ) -> BTreeMap<GroupId, String> {
        let SplitLimits {
            bytes_max,
            write_rows_per_second_max: rate_max,
        } = limits;
        if bytes_max == 0 && rate_max == 0 {
            return BTreeMap::new();
        }
        let reported = self.reported.lock();
        let mut split = BTreeMap::new();
        for (&group, desc) in &map.shards {
            let Some(&Report { load, at_ms, .. }) = reported.get(&group) else {
                continue;
            };
            if load.version != desc.epoch.version || now.saturating_sub(at_ms) > fresh_ms {
                continue;
            }
            let end = desc.end.map_or(1u128 << 64, u128::from);
            if end.saturating_sub(u128::from(desc.start)) < SPLIT_RANGE_WIDTH_MIN {
                continue;
            }
            if bytes_max > 0 && load.bytes > bytes_max {
                split.insert(
                    group,
                    format!(
                        "{} bytes, more than cluster.split_shard_bytes_max ({bytes_max})",
                        load.bytes
                    ),
                );
            } else if rate_max > 0 && load.write_rows_per_second > rate_max {
                split.insert(
                    group,
                    format!(
                        "{} rows written per second, more than \
                         cluster.split_shard_write_rows_per_second_max ({rate_max})",
                        load.write_rows_per_second
                    ),
                );
            }
        }
        split
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(group: GroupId) -> ShardLoad {
        ShardLoad {
            group,
            version: 0,
            bytes: u64::from(group),
            write_rows_per_second: 0,
            term: 1,
        }
    }

    /// Each peer is sent each measurement once, in pieces of at most
    /// `LOAD_REPORTS_PER_PING_MAX`; a ping that got no answer is sent again;
    /// a new measurement starts over.
    #[test]
    fn each_peer_gets_each_measurement_once_in_bounded_pings() {
        let loads = Loads::default();
        assert!(loads.outgoing(2).loads.is_empty(), "nothing measured yet");
        let count = LOAD_REPORTS_PER_PING_MAX + 10;
        loads.set_mine((0..count as GroupId).map(load).collect());
        let first = loads.outgoing(2);
        assert_eq!(first.loads.len(), LOAD_REPORTS_PER_PING_MAX);
        // Unanswered: the same again.
        assert_eq!(loads.outgoing(2).loads, first.loads);
        loads.delivered(2, &first);
        let second = loads.outgoing(2);
        assert_eq!(second.loads.len(), 10);
        assert_eq!(second.loads[0].group, LOAD_REPORTS_PER_PING_MAX as GroupId);
        loads.delivered(2, &second);
        assert!(loads.outgoing(2).loads.is_empty(), "peer 2 has it all");
        // A late answer to the first ping takes nothing back.
        loads.delivered(2, &first);
        assert!(loads.outgoing(2).loads.is_empty());
        // Peer 3 has been sent nothing.
        assert_eq!(loads.outgoing(3).loads.len(), LOAD_REPORTS_PER_PING_MAX);
        loads.set_mine(vec![load(7)]);
        assert_eq!(loads.outgoing(2).loads, vec![load(7)]);
    }

    /// Of two leaders' reports the higher term wins until it goes stale.
    #[test]
    fn the_report_of_the_higher_term_wins_until_stale() {
        let loads = Loads::default();
        let mut newer = load(1);
        newer.term = 5;
        loads.record(2, &[newer], 1_000, 3_000);
        loads.record(3, &[load(1)], 2_000, 3_000);
        assert_eq!(loads.leaders(2_000, 3_000)[&1], 2);
        loads.record(3, &[load(1)], 5_000, 3_000);
        assert_eq!(loads.leaders(5_000, 3_000)[&1], 3);
    }

    /// A shard splits on a fresh report of its current range over either
    /// limit (size first), and not on a stale report, a report from before
    /// its last split, or with the limit off; a shard too narrow to split
    /// again never does.
    #[test]
    fn shards_split_on_fresh_reports_over_their_limits() {
        use quiver_raft::cluster_map::{NodeInfo, NodeState};
        let nodes = (1..=3)
            .map(|id| {
                let info = NodeInfo {
                    addr: format!("h:{id}"),
                    peer_addr: format!("p:{id}"),
                    state: NodeState::Serving,
                };
                (id, info)
            })
            .collect();
        let replicas = (1..=4).map(|s| (s, vec![1, 2, 3])).collect();
        let mut map = ClusterMap::bootstrap(nodes, &replicas, 3, 3);
        // Shard 4 as narrow as a shard may get.
        let narrow = map.shards.get_mut(&4).unwrap();
        narrow.end = Some(narrow.start + (SPLIT_RANGE_WIDTH_MIN as u64 - 1));
        let report = |group, bytes, rate, version| ShardLoad {
            group,
            version,
            bytes,
            write_rows_per_second: rate,
            term: 1,
        };
        let loads = Loads::default();
        loads.record(
            1,
            &[
                report(1, 2_000, 10, 0),
                report(2, 10, 5_000, 0),
                report(3, 2_000, 5_000, 7),
                report(4, 2_000, 5_000, 0),
            ],
            1_000,
            3_000,
        );
        let limits = |bytes_max, write_rows_per_second_max| SplitLimits {
            bytes_max,
            write_rows_per_second_max,
        };
        let split = loads.over_split_limits(&map, limits(1_000, 1_000), 2_000, 3_000);
        assert_eq!(split.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        assert!(split[&1].contains("split_shard_bytes_max"), "{split:?}");
        assert!(
            split[&2].contains("5000 rows written per second"),
            "{split:?}"
        );
        // Only by size, only by rate, or never.
        let by_size = loads.over_split_limits(&map, limits(1_000, 0), 2_000, 3_000);
        assert_eq!(by_size.keys().copied().collect::<Vec<_>>(), vec![1]);
        let by_rate = loads.over_split_limits(&map, limits(0, 1_000), 2_000, 3_000);
        assert_eq!(by_rate.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert!(
            loads
                .over_split_limits(&map, limits(0, 0), 2_000, 3_000)
                .is_empty()
        );
        // Reports older than the freshness window count for nothing.
        assert!(
            loads
                .over_split_limits(&map, limits(1_000, 1_000), 4_001, 3_000)
                .is_empty()
        );
        // Sizes for balancing: fresh reports of the current range version
        // (shard 3's is from another version).
        let sizes = loads.sizes(&map, 2_000, 3_000);
        assert_eq!(sizes, BTreeMap::from([(1, 2_000), (2, 10), (4, 2_000)]));
        assert!(loads.sizes(&map, 4_001, 3_000).is_empty());
    }
}
