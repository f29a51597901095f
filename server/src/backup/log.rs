//! Continuous log backup (issue 12): every group's change stream (the data
//! shards' and the metadata group's) shipped to a backup target in chunks,
//! so a restore can start from a full backup's checkpoints and replay the
//! entries up to any time after them.
//!
//! Layout under the target (`backup.log_url`):
//!
//! ```text
//! log/<cluster id>/g<group>/<from index>-<next index>.chunk   write-once
//! log/<cluster id>/g<group>/LATEST                            overwritten
//! ```
//!
//! - **Who ships.** The leader of each group, every `log_interval_ms`: it
//!   reads the stream from the shipped position, writes the entries as one
//!   chunk (write-once: a deposed leader shipping the same range finds it
//!   there, and committed entries are the same whoever ships them), moves
//!   `LATEST`, then proposes `HoldLog` for [`LOG_CONSUMER`] at the shipped
//!   index. The hold keeps the log from being purged before what is
//!   shipped (up to `cluster.log_hold_bytes_max`), and the entry moves the
//!   group's leader time, so an idle shard's restorable time advances too.
//!   A hold follows every round that shipped entries other than holds; a
//!   group with nothing new (awake or hibernating) gets one only every
//!   `log_idle_interval_ms`, so an idle cluster stays nearly idle (and its
//!   restorable time lags by up to that much: nothing was written
//!   meanwhile, but only an entry can vouch for that).
//! - **A new leader** (or a leader in a new term) resumes from `LATEST`
//!   and any later chunk it lists; a shipper whose position's entries are
//!   gone looks there once more before it declares a gap.
//! - **A gap.** If the entries after the shipped position are gone (the
//!   hold's cap was passed while the target was down, or the leader caught
//!   up by snapshot), the stream starts again at the replica's applied
//!   position with an empty chunk, and is logged: times between the gap's
//!   two ends are restorable only from a full backup taken after it.
//!   `LATEST` carries the newest gap's end (`backup status` shows it).
//! - **First start.** A group that never shipped starts with everything
//!   its log still holds ([`ChangeStream::first_position`]): a backup taken
//!   before shipping began replays, and a split child ships from its seed.
//! - **Shipping off.** A node without a log URL releases the hold of a
//!   group it leads once it stood still for 10 idle intervals and no peer
//!   ships ([`release_loop`]).
//! - **Splits.** A replay applies a split with the shard's own code and
//!   hands back the child, whose own log is replayed next (see
//!   `restore.rs`).
//! - **Restorable time.** A chunk ends at the position after its last
//!   entry, with that entry's leader time `L`: every entry at or before
//!   `L - 1 µs` is shipped (leader times never go back; a later entry may
//!   share `L`). A group is restorable up to its `LATEST`'s `L - 1`, the
//!   cluster up to the least of its groups' (the RPO).
//! - **Replay.** [`replay_shipped`] walks a group's chunks from a
//!   checkpoint's position and applies their entries up to a time with the
//!   shard's own apply code (`quiver_raft::backup::replay`).
//!
//! Architecture invariant: the stream and its replay are
//! `quiver_raft`'s; this module moves chunks between a replica and a
//! target and decides which node ships what.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::async_runtime::WatchReceiver as _;
use quiver_raft::backup::{self as shard_backup, ReplayProgress};
use quiver_raft::change_stream::{
    ChangeEntry, ChangeLimits, ChangePosition, ChangeStream, ChangeStreamError,
};
use quiver_raft::{Command, GroupId, METADATA_GROUP, StateMachine};
use serde::{Deserialize, Serialize};

use super::{BackupError, Target};
use crate::cluster::{Cluster, Group};
use crate::node::Node;

/// The consumer name log shipping holds every group's log under.
pub const LOG_CONSUMER: &str = "backup-log";
/// The chunk format this build writes and reads.
pub const LOG_CHUNK_VERSION: u32 = 1;
/// Largest chunk read from a target.
pub const LOG_CHUNK_BYTES_MAX: usize = 64 << 20;
/// Largest `LATEST` pointer read.
const LATEST_BYTES_MAX: u64 = 64 << 10;
/// Entry bytes one chunk holds at most (a round writes several chunks if a
/// group has more).
const CHUNK_ENTRY_BYTES_MAX: usize = 8 << 20;
/// Chunks one group ships per round at most, so one busy group does not
/// hold up the others' rounds.
const CHUNKS_PER_ROUND_MAX: usize = 8;
/// Most chunk names a restore lists for one group.
const CHUNKS_LISTED_MAX: usize = 10_000_000;

/// One shipped piece of a group's change stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogChunk {
    /// [`LOG_CHUNK_VERSION`].
    pub version: u32,
    /// The group.
    pub group: GroupId,
    /// The position the chunk starts after.
    pub from: ChangePosition,
    /// The position after its last entry (where the next chunk starts).
    pub next: ChangePosition,
    /// When it was shipped (µs, the shipper's clock; informational).
    pub shipped_at_us: i64,
    /// The committed commands between the two.
    pub entries: Vec<ChangeEntry>,
}

impl LogChunk {
    /// Encodes it: postcard, then a crc32c of those bytes (little-endian).
    pub fn encode(&self) -> Result<Vec<u8>, BackupError> {
        let mut bytes = postcard::to_stdvec(self).map_err(|e| BackupError::Corrupt {
            what: format!("log chunk of group {}", self.group),
            reason: e.to_string(),
        })?;
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        Ok(bytes)
    }

    /// Decodes and checks a chunk read from `what` (bytes that may be
    /// anything): its crc, its version, its group, and that its entries
    /// lie in order between its two positions with times that never go
    /// back.
    pub fn decode(bytes: &[u8], group: GroupId, what: &str) -> Result<LogChunk, BackupError> {
        let corrupt = |reason: String| BackupError::Corrupt {
            what: what.to_owned(),
            reason,
        };
        if bytes.len() > LOG_CHUNK_BYTES_MAX {
            return Err(corrupt(format!(
                "{} bytes, more than {LOG_CHUNK_BYTES_MAX}",
                bytes.len()
            )));
        }
        let Some(body_len) = bytes.len().checked_sub(4) else {
            return Err(corrupt(format!("{} bytes: too short", bytes.len())));
        };
        let (body, crc) = bytes.split_at(body_len);
        let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32c::crc32c(body) != crc {
            return Err(corrupt("crc32c does not match".into()));
        }
        let chunk: LogChunk =
            postcard::from_bytes(body).map_err(|e| corrupt(format!("undecodable: {e}")))?;
        if chunk.version != LOG_CHUNK_VERSION {
            return Err(corrupt(format!(
                "format {} is not {LOG_CHUNK_VERSION}",
                chunk.version
            )));
        }
        if chunk.group != group {
            return Err(corrupt(format!("holds group {}", chunk.group)));
        }
        if chunk.next.index() < chunk.from.index()
            || chunk.next.leader_ts_us < chunk.from.leader_ts_us
        {
            return Err(corrupt("ends before it starts".into()));
        }
        let (mut index, mut ts) = (chunk.from.index(), chunk.from.leader_ts_us);
        for entry in &chunk.entries {
            if entry.log_id.index <= index
                || entry.log_id.index > chunk.next.index()
                || entry.leader_ts_us < ts
                || entry.leader_ts_us > chunk.next.leader_ts_us
            {
                return Err(corrupt(format!(
                    "entry {} is out of order or outside the chunk",
                    entry.log_id
                )));
            }
            (index, ts) = (entry.log_id.index, entry.leader_ts_us);
        }
        Ok(chunk)
    }
}

/// What `LATEST` holds: the newest chunk a shipper wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatestChunk {
    /// The chunk's file name.
    pub chunk: String,
    /// Where it ends.
    pub next: ChangePosition,
    /// When it was shipped (µs, the shipper's clock).
    pub shipped_at_us: i64,
    /// Where the newest gap in the group's shipped log ends (leader time,
    /// µs; `None`: no gap since shipping began): a restore to a later
    /// time needs a full backup taken at or after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap_at_us: Option<i64>,
}

impl LatestChunk {
    /// The latest leader time up to which every entry is shipped (µs).
    pub fn restorable_until_us(&self) -> i64 {
        self.next.leader_ts_us.saturating_sub(1)
    }
}

/// The directory of `group`'s chunks for cluster `cluster_id`.
fn group_prefix(cluster_id: &str, group: GroupId) -> String {
    format!("log/{cluster_id}/g{group:010}")
}

/// A chunk's file name.
fn chunk_name(from: u64, next: u64) -> String {
    format!("{from:020}-{next:020}.chunk")
}

/// The `(from, next)` indexes in a chunk's file name.
fn parse_chunk_name(name: &str) -> Option<(u64, u64)> {
    let (from, next) = name.strip_suffix(".chunk")?.split_once('-')?;
    if from.len() != 20 || next.len() != 20 {
        return None;
    }
    Some((from.parse().ok()?, next.parse().ok()?))
}

/// Whether `id` can be a cluster id (16 lowercase hex digits).
pub fn check_cluster_id(id: &str) -> Result<(), BackupError> {
    if id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(BackupError::Invalid(format!(
            "{:?} is not a cluster id (16 hex digits)",
            id.chars().take(40).collect::<String>()
        )))
    }
}

/// Reads `group`'s `LATEST` pointer (`None`: nothing shipped yet).
pub async fn latest(
    target: &Target,
    cluster_id: &str,
    group: GroupId,
) -> Result<Option<LatestChunk>, BackupError> {
    let key = format!("{}/LATEST", group_prefix(cluster_id, group));
    let Some(bytes) = target.get(&key, LATEST_BYTES_MAX).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| BackupError::Corrupt {
            what: key,
            reason: e.to_string(),
        })
}

/// Reads and checks one chunk.
async fn read_chunk(
    target: &Target,
    cluster_id: &str,
    group: GroupId,
    name: &str,
) -> Result<LogChunk, BackupError> {
    let key = format!("{}/{name}", group_prefix(cluster_id, group));
    let bytes = target
        .get(&key, LOG_CHUNK_BYTES_MAX as u64)
        .await?
        .ok_or_else(|| BackupError::Corrupt {
            what: key.clone(),
            reason: "missing".into(),
        })?;
    // Decoding checks a crc over up to 64 MiB: not on the async workers.
    let what = std::path::PathBuf::from(&key);
    super::blocking(&what, move || LogChunk::decode(&bytes, group, &key)).await
}

/// Every chunk of `group` as `(from, next, name)`, by `from` then `next`.
async fn list_chunks(
    target: &Target,
    cluster_id: &str,
    group: GroupId,
    after: Option<&str>,
) -> Result<Vec<(u64, u64, String)>, BackupError> {
    let prefix = group_prefix(cluster_id, group);
    let mut chunks: Vec<(u64, u64, String)> = target
        .list_files(&prefix, after, CHUNKS_LISTED_MAX)
        .await?
        .into_iter()
        .filter_map(|name| parse_chunk_name(&name).map(|(from, next)| (from, next, name)))
        .collect();
    chunks.sort();
    Ok(chunks)
}

/// When any group of cluster `cluster_id` last shipped (µs, by its
/// `LATEST`; 0 if none did).
pub async fn last_shipped_us(target: &Target, cluster_id: &str) -> Result<i64, BackupError> {
    let mut last = 0;
    for group in shipped_groups(target, cluster_id).await? {
        if let Some(latest) = latest(target, cluster_id, group).await? {
            last = last.max(latest.shipped_at_us);
        }
    }
    Ok(last)
}

/// The groups of cluster `cluster_id` with a shipped log at the target
/// (groups are only ever added, by splits: these are all it had since
/// shipping began).
pub async fn shipped_groups(
    target: &Target,
    cluster_id: &str,
) -> Result<Vec<GroupId>, BackupError> {
    Ok(target
        .list_dirs(&format!("log/{cluster_id}"))
        .await?
        .iter()
        .filter_map(|dir| dir.strip_prefix('g').and_then(|g| g.parse().ok()))
        .collect())
}

/// Deletes `group`'s chunks that end at or before `index` (with
/// `dry_run`, only counts them); returns how many.
pub async fn prune_chunks(
    target: &Target,
    cluster_id: &str,
    group: GroupId,
    index: u64,
    dry_run: bool,
) -> Result<u64, BackupError> {
    let prefix = group_prefix(cluster_id, group);
    let mut deleted = 0;
    for (_, next, name) in list_chunks(target, cluster_id, group, None).await? {
        if next > index {
            continue;
        }
        if !dry_run {
            target.delete(&format!("{prefix}/{name}")).await?;
        }
        deleted += 1;
    }
    Ok(deleted)
}

/// What a replay of one group's shipped log did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShippedReplay {
    /// Chunks read.
    pub chunks: u64,
    /// Entries applied.
    pub entries: u64,
    /// Shards split off during the replay (see
    /// `quiver_raft::backup::ReplayProgress::children`).
    pub children: Vec<(GroupId, std::path::PathBuf)>,
}

/// A walk along one group's shipped chunks from a position: each step is
/// the chunk going furthest from where the walk stands, read, its crc and
/// its contents checked against its name and the position (a chunk of
/// another history is corrupt, not skipped).
pub struct ChainWalk<'a> {
    target: &'a Target,
    cluster_id: &'a str,
    group: GroupId,
    /// Every chunk of the group as `(from, next, name)`, by `from`.
    chunks: Vec<(u64, u64, String)>,
    /// Chunks starting at or before the position, looked at already: they
    /// only grow as it moves, so one pass over the list serves the walk.
    considered: usize,
    /// Of those, the one reaching furthest.
    furthest: Option<usize>,
    /// Where the walk stands: the last entry read and the time after it.
    position: ChangePosition,
}

impl<'a> ChainWalk<'a> {
    /// A walk of `group`'s chunks from `position` (a checkpoint's).
    pub async fn new(
        target: &'a Target,
        cluster_id: &'a str,
        group: GroupId,
        position: ChangePosition,
    ) -> Result<ChainWalk<'a>, BackupError> {
        let chunks = list_chunks(target, cluster_id, group, None).await?;
        Ok(Self::over(target, cluster_id, group, position, chunks))
    }

    /// [`Self::new`] over `chunks`, the group's chunks as listed.
    fn over(
        target: &'a Target,
        cluster_id: &'a str,
        group: GroupId,
        position: ChangePosition,
        chunks: Vec<(u64, u64, String)>,
    ) -> ChainWalk<'a> {
        ChainWalk {
            target,
            cluster_id,
            group,
            chunks,
            considered: 0,
            furthest: None,
            position,
        }
    }

    /// Where the walk stands.
    pub fn position(&self) -> ChangePosition {
        self.position
    }

    /// The next chunk of the chain (the walk then stands at its end);
    /// `None` at the end of the shipped log. A chain that breaks while
    /// chunks lie past the break (a gap) is an error.
    pub async fn next(&mut self) -> Result<Option<LogChunk>, BackupError> {
        let group = self.group;
        let at = self.position.index();
        while let Some(chunk) = self
            .chunks
            .get(self.considered)
            .filter(|(from, _, _)| *from <= at)
        {
            if self.furthest.is_none_or(|i| chunk.1 > self.chunks[i].1) {
                self.furthest = Some(self.considered);
            }
            self.considered += 1;
        }
        let Some((named_from, named_next, name)) = self
            .furthest
            .map(|i| &self.chunks[i])
            .filter(|(_, next, _)| *next > at)
        else {
            if self.considered < self.chunks.len() {
                return Err(BackupError::Refused(format!(
                    "group {group}: its shipped log has a gap after index {at} (leader time {}): \
                     restore from a full backup taken after it",
                    time_text(self.position.leader_ts_us)
                )));
            }
            return Ok(None);
        };
        let what = format!("{}/{name}", group_prefix(self.cluster_id, group));
        let chunk = read_chunk(self.target, self.cluster_id, group, name).await?;
        if (chunk.from.index(), chunk.next.index()) != (*named_from, *named_next) {
            return Err(BackupError::Corrupt {
                what,
                reason: format!(
                    "holds indexes {}..{}, not those of its name",
                    chunk.from.index(),
                    chunk.next.index()
                ),
            });
        }
        if chunk.from.index() == at && chunk.from.log_id != self.position.log_id {
            return Err(BackupError::Corrupt {
                what,
                reason: format!(
                    "starts after {:?}, the checkpoint is at {:?}: another history",
                    chunk.from.log_id, self.position.log_id
                ),
            });
        }
        self.position = chunk.next;
        Ok(Some(chunk))
    }
}

/// Applies to `state` (a checkpoint opened for replay) the entries of its
/// group's shipped log after its position, up to `until_us`. Fails, changing
/// nothing more, if the shipped log has a gap after the position or does
/// not reach past `until_us` (the time is not restorable yet).
pub async fn replay_shipped(
    target: &Target,
    cluster_id: &str,
    state: &StateMachine,
    until_us: i64,
) -> Result<ShippedReplay, BackupError> {
    let group = state.group();
    let (log_id, leader_ts_us) = state.applied_position();
    if leader_ts_us > until_us {
        return Err(BackupError::Refused(format!(
            "group {group}: the checkpoint is at leader time {}, after the time asked",
            time_text(leader_ts_us)
        )));
    }
    let position = ChangePosition {
        log_id,
        leader_ts_us,
    };
    let mut walk = ChainWalk::new(target, cluster_id, group, position).await?;
    let mut report = ShippedReplay::default();
    loop {
        let Some(chunk) = walk.next().await? else {
            let reached = walk.position();
            return Err(BackupError::Refused(format!(
                "group {group}: its shipped log reaches only index {} (leader time {}): the \
                 time asked is not restorable yet",
                reached.index(),
                time_text(reached.leader_ts_us)
            )));
        };
        report.chunks += 1;
        let replayed = state.clone();
        let ReplayProgress {
            applied,
            reached_time,
            children,
        } = tokio::task::spawn_blocking(move || {
            shard_backup::replay(&replayed, chunk.entries, until_us)
        })
        .await
        .map_err(|e| BackupError::Invalid(format!("replay task: {e}")))??;
        report.entries += applied;
        report.children.extend(children);
        if reached_time {
            return Ok(report);
        }
    }
}

/// How far one group's shipped log was walked by [`verify_shipped`].
#[derive(Debug)]
pub struct ShippedWalk {
    /// The group.
    pub group: GroupId,
    /// Chunks read and checked.
    pub chunks: u64,
    /// Where the unbroken chain from the start ends: every entry at or
    /// before its leader time less 1 µs is there.
    pub reached: ChangePosition,
    /// What stopped the walk before the end of what was shipped: a gap
    /// ([`BackupError::Refused`]) or a damaged chunk.
    pub stopped: Option<BackupError>,
}

/// Reads and checks the shipped log a restore to a time would replay onto
/// a backup whose parts are `parts`: each part's chunks from its position
/// to the end of what was shipped, then the log of every shard split off
/// in them (from the split, as a replay builds it), and so on.
pub async fn verify_shipped(
    target: &Target,
    cluster_id: &str,
    parts: &[(GroupId, ChangePosition)],
) -> Result<Vec<ShippedWalk>, BackupError> {
    let shipped = shipped_groups(target, cluster_id).await?;
    // Each with its chunks if they were listed already (a child's).
    type Listed = Vec<(u64, u64, String)>;
    let mut queue: std::collections::VecDeque<(GroupId, ChangePosition, Option<Listed>)> =
        parts.iter().map(|&(g, p)| (g, p, None)).collect();
    let mut walked: Vec<ShippedWalk> = Vec::with_capacity(parts.len());
    while let Some((group, position, listed)) = queue.pop_front() {
        if walked.iter().any(|w| w.group == group) {
            continue;
        }
        let mut walk = match listed {
            Some(chunks) => ChainWalk::over(target, cluster_id, group, position, chunks),
            None => ChainWalk::new(target, cluster_id, group, position).await?,
        };
        let mut chunks = 0;
        // Per child, every split entry naming it: a split refused for a
        // stale range is proposed again (the last one applied), and a
        // proposal retried after a timeout is logged twice (the first one
        // applied). Which one built the child is read off its log below.
        let mut children: Vec<(GroupId, Vec<ChangePosition>)> = Vec::new();
        let stopped = loop {
            match walk.next().await {
                Ok(Some(chunk)) => {
                    chunks += 1;
                    for entry in &chunk.entries {
                        if let Command::Split { child, .. } = entry.command {
                            let seed = ChangePosition {
                                log_id: Some(quiver_raft::state_machine::child_seed(
                                    entry.log_id.index,
                                )),
                                leader_ts_us: entry.leader_ts_us,
                            };
                            match children.iter_mut().find(|(c, _)| *c == child) {
                                Some((_, seeds)) => seeds.push(seed),
                                None => children.push((child, vec![seed])),
                            }
                        }
                    }
                }
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        // A child with no shipped log is skipped: its split was refused
        // (the log does not say), or its leader never shipped (a restore
        // past the split then fails on it, naming it).
        for (child, seeds) in children {
            if !shipped.contains(&child) {
                continue;
            }
            // The child's log starts at its seed: the split whose index
            // its first chunk starts after; else the last split.
            let listed = list_chunks(target, cluster_id, child, None).await?;
            let first = listed.iter().map(|(from, _, _)| *from).min();
            let seed = seeds
                .iter()
                .find(|seed| Some(seed.index()) == first)
                .or(seeds.last())
                .copied();
            queue.extend(seed.map(|seed| (child, seed, Some(listed))));
        }
        walked.push(ShippedWalk {
            group,
            chunks,
            reached: walk.position(),
            stopped,
        });
    }
    Ok(walked)
}

/// Per group, what this node's shipper knows while it leads it.
#[derive(Debug, Clone)]
struct Shipped {
    /// The term this node leads the group in: a leader that lost the
    /// group and won it back resumes from the target (another leader may
    /// have shipped, and held the log, meanwhile).
    term: u64,
    /// What the target holds up to.
    position: ChangePosition,
    /// When the group's time was last advanced by a hold (`None`: not by
    /// this shipper).
    held_at: Option<std::time::Instant>,
    /// Entries other than holds were shipped since the last hold: the
    /// group's time must follow them.
    pending: bool,
    /// Carried into every `LATEST` (see [`LatestChunk::gap_at_us`]).
    gap_at_us: Option<i64>,
}

/// How often log shipping runs.
#[derive(Debug, Clone, Copy)]
pub struct ShippingTiming {
    /// Between rounds.
    pub interval: Duration,
    /// Between two holds proposed to a sleeping group.
    pub idle_interval: Duration,
}

/// Runs log shipping to `url` every `timing.interval` until the node goes
/// away or stops.
pub async fn shipping_loop(node: Weak<Node>, url: String, timing: ShippingTiming) {
    let mut shipped: HashMap<GroupId, Shipped> = HashMap::new();
    let mut target: Option<Target> = None;
    let mut rounds = crate::node::Rounds::new(node, timing.interval, false);
    while let Some(node) = rounds.next().await {
        if target.is_none() {
            match node.backups.target_for_writing(&url) {
                Ok(opened) => target = Some(opened),
                Err(e) => {
                    tracing::warn!(error = %e, "log shipping: the target cannot be opened");
                    continue;
                }
            }
        }
        if let Some(target) = &target {
            ship_round(&node.cluster, target, &mut shipped, timing.idle_interval).await;
        }
    }
}

/// The groups this node leads now, with the term.
fn led_groups(cluster: &Cluster) -> Vec<(GroupId, Arc<Group>, u64)> {
    cluster
        .groups()
        .into_iter()
        .filter_map(|(group, hosted)| {
            let term = {
                let metrics = hosted.raft.metrics();
                let m = metrics.borrow_watched();
                (m.state == openraft::ServerState::Leader).then_some(m.current_term)
            };
            term.map(|term| (group, hosted, term))
        })
        .collect()
}

/// How many idle intervals a log hold may stand still on a group this node
/// leads without shipping before it is released: long enough that a
/// leader moving for a moment to a node configured without shipping (a
/// rolling change) does not drop a hold the shipper still needs.
const HOLD_RELEASE_IDLE_INTERVALS: u32 = 10;

/// On a node that does not ship (no `backup.log_url`): releases the log
/// hold of a group it leads once the hold has not moved for
/// [`HOLD_RELEASE_IDLE_INTERVALS`] idle intervals and every peer says it
/// does not ship either, so turning shipping off gives the log back to
/// ordinary purging instead of keeping up to `log_hold_bytes_max` per
/// group for a shipper that is gone. While a peer ships (or is not heard
/// from), a shipper may lead the group again and needs the log: a node
/// configured without shipping in a shipping cluster keeps the holds.
/// Checks once per idle interval: an idle node does nothing else.
pub async fn release_loop(node: Weak<Node>, idle_interval: Duration) {
    let release_after = idle_interval.saturating_mul(HOLD_RELEASE_IDLE_INTERVALS);
    // Per group, the held index seen and since when (while led here).
    let mut seen: HashMap<GroupId, (u64, std::time::Instant)> = HashMap::new();
    let mut rounds = crate::node::Rounds::new(node, idle_interval, true);
    while let Some(node) = rounds.next().await {
        let led = led_groups(&node.cluster);
        seen.retain(|group, _| led.iter().any(|(g, _, _)| g == group));
        for (group, hosted, _) in led {
            let Some(&index) = hosted.state.log_holds().get(LOG_CONSUMER) else {
                seen.remove(&group);
                continue;
            };
            let now = std::time::Instant::now();
            let since = match seen.get(&group) {
                Some(&(held, since)) if held == index => since,
                _ => {
                    seen.insert(group, (index, now));
                    continue;
                }
            };
            if now.duration_since(since) < release_after {
                continue;
            }
            if let Some(ships) = node.cluster.a_peer_ships_log() {
                if ships {
                    // Not the whole cluster's choice: kept for the shipper.
                    continue;
                }
            } else {
                tracing::debug!(group, "a peer is not heard from: the log hold is kept");
                continue;
            }
            let release = Command::ReleaseLog {
                consumer: LOG_CONSUMER.to_owned(),
            };
            match node.cluster.propose(group, release).await {
                Ok(_) => {
                    tracing::info!(
                        group,
                        index,
                        "log shipping is off here: the shipped log's hold is released"
                    );
                    seen.remove(&group);
                }
                Err(e) => tracing::warn!(group, error = %e, "releasing a log hold failed"),
            }
        }
    }
}

/// One round: every group this node leads ships what is new.
async fn ship_round(
    cluster: &Arc<Cluster>,
    target: &Target,
    shipped: &mut HashMap<GroupId, Shipped>,
    idle_interval: Duration,
) {
    let Some(cluster_id) = cluster
        .group(METADATA_GROUP)
        .and_then(|metadata| metadata.state.cluster_id().ok().flatten())
    else {
        // Right after a start the metadata replica may not have applied
        // the bootstrap yet; a map without an id is a cluster bootstrapped
        // by a build that drew none.
        if cluster
            .group(METADATA_GROUP)
            .is_some_and(|metadata| metadata.state.cluster_map().is_some())
        {
            tracing::warn!(
                "log shipping cannot run: this cluster has no id (bootstrapped before ids \
                 existed); nothing is shipped"
            );
        }
        return;
    };
    let groups = led_groups(cluster);
    // A group not led here in the same term is resumed from the target
    // when it is again: another leader may have shipped meanwhile.
    shipped.retain(|group, state| {
        groups
            .iter()
            .any(|(g, _, term)| g == group && *term == state.term)
    });
    for (group, hosted, term) in groups {
        let state = match shipped.remove(&group) {
            Some(state) => Some(state),
            None => match resume(target, &cluster_id, group, term).await {
                Ok(state) => state,
                Err(e) => {
                    // Starting anew could skip entries a reachable LATEST
                    // would have resumed from: wait for the target.
                    tracing::warn!(group, error = %e, "log shipping cannot resume; retried next round");
                    continue;
                }
            },
        };
        let stream = ChangeStream::new(hosted.log.clone(), hosted.state.clone());
        let ship = GroupShip {
            cluster,
            target,
            cluster_id: &cluster_id,
            group,
            term,
            stream,
        };
        match ship.run(state, idle_interval).await {
            Ok(state) => {
                shipped.insert(group, state);
            }
            Err(e) => tracing::warn!(group, error = %e, "log shipping failed; retried next round"),
        }
    }
}

/// Where `group`'s shipped log ends, from the target; `None` if nothing
/// was shipped.
async fn resume(
    target: &Target,
    cluster_id: &str,
    group: GroupId,
    term: u64,
) -> Result<Option<Shipped>, BackupError> {
    let latest = latest(target, cluster_id, group).await?;
    let gap_at_us = latest.as_ref().and_then(|l| l.gap_at_us);
    // A chunk written after LATEST (its writer died before moving it).
    let after = latest.as_ref().map(|l| l.chunk.clone());
    let later = list_chunks(target, cluster_id, group, after.as_deref())
        .await?
        .into_iter()
        .max_by_key(|(_, next, _)| *next);
    let mut position = latest.map(|l| l.next);
    if let Some((_, next, name)) = later
        && position.is_none_or(|p| next > p.index())
    {
        position = Some(read_chunk(target, cluster_id, group, &name).await?.next);
    }
    Ok(position.map(|position| Shipped {
        term,
        position,
        held_at: None,
        pending: true,
        gap_at_us,
    }))
}

/// One group's shipping, by this node as its leader in `term`.
struct GroupShip<'a> {
    cluster: &'a Arc<Cluster>,
    target: &'a Target,
    cluster_id: &'a str,
    group: GroupId,
    term: u64,
    stream: ChangeStream,
}

impl GroupShip<'_> {
    /// Ships what the group committed since `state` (or, if nothing was
    /// shipped, marks where its shipped log starts), then holds the log
    /// there if entries were shipped since the last hold or the group's
    /// time has not moved for `idle_interval` (an idle group, awake or
    /// asleep, is woken for it no more often).
    async fn run(
        &self,
        state: Option<Shipped>,
        idle_interval: Duration,
    ) -> Result<Shipped, BackupError> {
        let group = self.group;
        let prefix = group_prefix(self.cluster_id, group);
        let mut state = match state {
            Some(state) => state,
            None => self.start_anew(&prefix, None).await?,
        };
        let limits = ChangeLimits {
            entries_max: 1 << 20,
            bytes_max: CHUNK_ENTRY_BYTES_MAX,
        };
        let mut resumed = false;
        for _ in 0..CHUNKS_PER_ROUND_MAX {
            let (reader, from) = (self.stream.clone(), state.position);
            let read = tokio::task::spawn_blocking(move || reader.read(&from, limits))
                .await
                .map_err(|e| BackupError::Invalid(format!("log read task: {e}")))?;
            let batch = match read {
                Ok(batch) => batch,
                Err(ChangeStreamError::Ahead { .. }) => break,
                Err(ChangeStreamError::Purged { .. } | ChangeStreamError::Diverged { .. })
                    if !resumed =>
                {
                    // Another leader may have shipped past this position
                    // (and let the log go): go on from the target's end.
                    resumed = true;
                    if let Some(there) =
                        resume(self.target, self.cluster_id, group, self.term).await?
                        && there.position != state.position
                    {
                        state.position = there.position;
                        state.gap_at_us = there.gap_at_us;
                        continue;
                    }
                    state = self.start_anew(&prefix, Some(state.position)).await?;
                    break;
                }
                Err(ChangeStreamError::Purged { .. } | ChangeStreamError::Diverged { .. }) => {
                    state = self.start_anew(&prefix, Some(state.position)).await?;
                    break;
                }
                Err(ChangeStreamError::Io(e)) => {
                    return Err(BackupError::Io {
                        what: format!("group {group}'s log"),
                        source: e,
                    });
                }
            };
            if batch.next.index() == state.position.index() {
                break;
            }
            state.pending |= batch.entries.iter().any(|entry| {
                !matches!(&entry.command, Command::HoldLog { consumer, .. } if consumer == LOG_CONSUMER)
            });
            write_chunk(
                self.target,
                &prefix,
                group,
                (state.position, batch.next),
                batch.entries,
                state.gap_at_us,
            )
            .await?;
            state.position = batch.next;
        }
        // The hold, and the entry that moves the group's time forward.
        let due = state.pending || state.held_at.is_none_or(|at| at.elapsed() >= idle_interval);
        if due {
            let hold = Command::HoldLog {
                consumer: LOG_CONSUMER.to_owned(),
                index: state.position.index(),
            };
            match self.cluster.propose(group, hold).await {
                Ok(_) => {
                    state.held_at = Some(std::time::Instant::now());
                    state.pending = false;
                }
                Err(e) => tracing::debug!(group, error = %e, "log hold not proposed"),
            }
        }
        Ok(state)
    }

    /// Starts the shipped log again where this replica is, with an empty
    /// chunk: the start of shipping, or (after `lost`, a position whose
    /// entries are gone) a gap only a later full backup bridges.
    async fn start_anew(
        &self,
        prefix: &str,
        lost: Option<ChangePosition>,
    ) -> Result<Shipped, BackupError> {
        let group = self.group;
        // A group shipping for the first time ships everything its log
        // still has, so a backup taken before shipping began (the first
        // scheduled backup of a new cluster) replays, and a shard split off
        // another ships from the split on (a restore replays its parent to
        // the split, then its log). After a gap: from where it is now.
        let start = if lost.is_none() {
            let stream = self.stream.clone();
            tokio::task::spawn_blocking(move || stream.first_position())
                .await
                .unwrap_or_else(|_| self.stream.position())
        } else {
            self.stream.position()
        };
        match lost {
            None => tracing::info!(group, position = ?start, "log shipping starts"),
            Some(lost) => tracing::error!(
                group, from = ?lost, restart = ?start,
                "log shipping: the entries after the shipped position are gone; the shipped log \
                 has a gap: take a full backup"
            ),
        }
        let gap_at_us = lost.map(|_| start.leader_ts_us);
        write_chunk(
            self.target,
            prefix,
            group,
            (start, start),
            Vec::new(),
            gap_at_us,
        )
        .await?;
        Ok(Shipped {
            term: self.term,
            position: start,
            held_at: None,
            pending: true,
            gap_at_us,
        })
    }
}

/// Writes one chunk of `(from, next)` (once: a chunk already there is the
/// same committed entries) and moves `LATEST` to it.
async fn write_chunk(
    target: &Target,
    prefix: &str,
    group: GroupId,
    (from, next): (ChangePosition, ChangePosition),
    entries: Vec<ChangeEntry>,
    gap_at_us: Option<i64>,
) -> Result<(), BackupError> {
    let shipped_at_us = super::now_us();
    let chunk = LogChunk {
        version: LOG_CHUNK_VERSION,
        group,
        from,
        next,
        shipped_at_us,
        entries,
    };
    let name = chunk_name(from.index(), next.index());
    let key = format!("{prefix}/{name}");
    // Encoding is CPU over the whole chunk: not on the async workers.
    let bytes = super::blocking(std::path::Path::new(&key), move || chunk.encode()).await?;
    match target.put_new(&key, bytes).await {
        Ok(()) | Err(BackupError::Store(object_store::Error::AlreadyExists { .. })) => {}
        Err(e) => return Err(e),
    }
    let latest = LatestChunk {
        chunk: name,
        next,
        shipped_at_us,
        gap_at_us,
    };
    let bytes = serde_json::to_vec(&latest).map_err(|e| BackupError::Invalid(e.to_string()))?;
    target.put(&format!("{prefix}/LATEST"), bytes).await
}

/// Waits, up to `wait`, until every one of `groups` is restorable to
/// `until_us` (its shipper, in a live source cluster, advances an idle
/// group within `log_idle_interval_ms`). Returns whether they are.
pub async fn wait_restorable(
    target: &Target,
    cluster_id: &str,
    groups: &[GroupId],
    until_us: i64,
    wait: Duration,
) -> Result<bool, BackupError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let lagging: Vec<GroupId> = status(target, cluster_id, groups)
            .await?
            .into_iter()
            .filter(|g| {
                g.latest
                    .as_ref()
                    .is_none_or(|l| l.restorable_until_us() < until_us)
            })
            .map(|g| g.group)
            .collect();
        if lagging.is_empty() {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tracing::info!(?lagging, until = %time_text(until_us), "waiting for the shipped log to reach the time");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A leader time (µs since the epoch) as RFC 3339 with microseconds.
pub fn time_text(us: i64) -> String {
    match u64::try_from(us) {
        Ok(us) => {
            humantime::format_rfc3339_micros(std::time::UNIX_EPOCH + Duration::from_micros(us))
                .to_string()
        }
        Err(_) => format!("{us} µs"),
    }
}

/// One group's shipped log, as `backup status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLogStatus {
    /// The group.
    pub group: GroupId,
    /// What its `LATEST` says (`None`: nothing shipped).
    pub latest: Option<LatestChunk>,
}

/// The shipped log of `groups` of cluster `cluster_id` at `url`: per group
/// its `LATEST`.
pub async fn status(
    target: &Target,
    cluster_id: &str,
    groups: &[GroupId],
) -> Result<Vec<GroupLogStatus>, BackupError> {
    check_cluster_id(cluster_id)?;
    let mut out = Vec::with_capacity(groups.len());
    for &group in groups {
        let latest = latest(target, cluster_id, group).await?;
        out.push(GroupLogStatus { group, latest });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::log_id;
    use proptest::prelude::*;
    use quiver_raft::TypeConfig;

    fn chunk(entries: u64) -> LogChunk {
        let id = |i| log_id::<TypeConfig>(3, quiver_raft::ReplicaId(1), i);
        LogChunk {
            version: LOG_CHUNK_VERSION,
            group: 4,
            from: ChangePosition {
                log_id: Some(id(10)),
                leader_ts_us: 1_000,
            },
            next: ChangePosition {
                log_id: Some(id(10 + entries + 1)),
                leader_ts_us: 1_000 + entries as i64,
            },
            shipped_at_us: 5,
            entries: (1..=entries)
                .map(|i| ChangeEntry {
                    log_id: id(10 + i),
                    leader_ts_us: 1_000 + i as i64,
                    request_id: u128::from(i),
                    command: Command::Fence,
                })
                .collect(),
        }
    }

    #[test]
    fn a_chunk_comes_back_as_written_and_names_sort_by_index() {
        let written = chunk(3);
        let bytes = written.encode().unwrap();
        assert_eq!(LogChunk::decode(&bytes, 4, "c").unwrap(), written);
        assert!(LogChunk::decode(&bytes, 5, "c").is_err(), "another group's");
        assert_eq!(parse_chunk_name(&chunk_name(7, 12)), Some((7, 12)));
        assert!(chunk_name(9, 10) < chunk_name(10, 11));
        assert_eq!(parse_chunk_name("LATEST"), None);
        assert_eq!(parse_chunk_name("1-2.chunk"), None);
    }

    #[test]
    fn a_chunk_out_of_order_is_refused() {
        let mut bad = chunk(3);
        bad.entries.swap(0, 1);
        assert!(LogChunk::decode(&bad.encode().unwrap(), 4, "c").is_err());
        let mut late = chunk(3);
        late.entries[2].leader_ts_us = 9_999;
        assert!(LogChunk::decode(&late.encode().unwrap(), 4, "c").is_err());
    }

    proptest! {
        #[test]
        fn mutated_chunks_never_panic_and_never_pass(
            at in any::<usize>(),
            bits in 1u8..,
            cut in any::<usize>(),
        ) {
            // One byte changed: a crc32c always sees it.
            let bytes = chunk(5).encode().unwrap();
            let mut flipped = bytes.clone();
            let at = at % flipped.len();
            flipped[at] ^= bits;
            prop_assert!(LogChunk::decode(&flipped, 4, "c").is_err());
            let cut = cut % bytes.len();
            prop_assert!(LogChunk::decode(&bytes[..cut], 4, "c").is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = LogChunk::decode(&bytes, 4, "c");
        }
    }
}
