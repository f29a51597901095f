//! Shard load reports, for splits by size and by load.
//!
//! Every `cluster.load_report_interval_ms` each node measures the shards it
//! leads: the bytes of the shard's own key range (RocksDB's approximate
//! size of the table files over that range, plus the memtables: after a
//! split both halves share table files until compaction, so a range is what
//! says how big each half is) and the rows written per second since the
//! last measurement. The liveness pings, which every node sends every peer
//! anyway, carry the reports, so the metadata leader knows every shard's
//! load without asking; a report names the shard's range version, and one
//! made before the shard's last split is ignored. The scheduler splits a
//! shard whose report exceeds `cluster.split_shard_bytes_max` or
//! `cluster.split_shard_write_rows_per_second_max` (0: never).
//!
//! A report also says who leads the shard, and in which term: the leader
//! balancer ([`super::scheduler::plan_leader`]) counts leaders from it. Of
//! two reports for a shard the one of the higher term wins (a deposed
//! leader that has not heard of its successor keeps reporting), and a
//! handover the balancer made counts as a report of its new term.

use std::collections::{BTreeMap, HashMap};

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use parking_lot::Mutex;
use quiver_raft::cluster_map::ClusterMap;
use quiver_raft::{GroupId, NodeId};
use serde::{Deserialize, Serialize};

use super::Cluster;

/// Most load reports one ping carries (a node leads at most this many
/// shards worth reporting at once; the rest wait for the next round).
pub const LOAD_REPORTS_PER_PING_MAX: usize = 4096;

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
    /// This node's own reports, as its pings carry them.
    mine: Mutex<Vec<ShardLoad>>,
    /// When this node last measured, and each led shard's row counter then.
    samples: Mutex<(u64, HashMap<GroupId, u64>)>,
}

impl Loads {
    /// This node's reports (what its pings carry).
    pub fn mine(&self) -> Vec<ShardLoad> {
        self.mine.lock().clone()
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
    /// Measures the shards this node leads, if an interval has passed since
    /// the last time (called every liveness round).
    pub(super) fn measure_loads(&self, now_ms: u64) {
        let interval_ms = self.config.load_report_interval_ms;
        let (elapsed_ms, previous) = {
            let samples = self.loads.samples.lock();
            if samples.0 != 0 && now_ms.saturating_sub(samples.0) < interval_ms {
                return;
            }
            (now_ms.saturating_sub(samples.0), samples.1.clone())
        };
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
                bytes: store.approximate_bytes(start, end),
                write_rows_per_second: rate,
                term,
            });
        }
        self.loads
            .record(self.node_id, &mine, now_ms, self.load_reports_fresh_ms());
        *self.loads.mine.lock() = mine;
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
        let bytes_max = self.config.split_shard_bytes_max;
        let rate_max = self.config.split_shard_write_rows_per_second_max;
        if bytes_max == 0 && rate_max == 0 {
            return BTreeMap::new();
        }
        let now = self.now_ms();
        let fresh_ms = self.load_reports_fresh_ms();
        let reported = self.loads.reported.lock();
        let mut split = BTreeMap::new();
        for (&group, desc) in &map.shards {
            let Some(&Report { load, at_ms, .. }) = reported.get(&group) else {
                continue;
            };
            if load.version != desc.epoch.version || now.saturating_sub(at_ms) > fresh_ms {
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
