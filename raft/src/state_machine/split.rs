//! Shard splits, applied by every replica of a shard at the same log
//! position, as TiKV's raftstore-v2 does with one RocksDB per region:
//!
//! 1. The entry names the range and version the split was decided on; a
//!    replica whose range differs refuses it (not recorded against the
//!    request id, so the proposer retries with the current epoch).
//! 2. Each replica builds its replica of the new shard from a checkpoint of
//!    its own store (hard links), trimmed to `[at, end)`, in a staging
//!    directory that is renamed into place when complete: the new shard's
//!    state says it applied a seed log id at the split's index, in term 0,
//!    with the parent's membership (the same replica ids: ids are unique per
//!    group, and the new group has never used any), and its log starts
//!    after that seed. openraft opens it as a replica that installed a
//!    snapshot there; the first election is in term 1. The parent's
//!    change-stream consumers hold the child's log from the seed.
//! 3. The parent keeps `[start, at)`: one batch deletes the rest and records
//!    the new range with the applied position.
//!
//! A crash anywhere replays the entry (the store is not fsynced; the log
//! is): a complete child directory is kept as it is (its replica may have
//! applied more since), the parent's batch is applied again.

use std::io;
use std::path::Path;

use openraft::vote::RaftLeaderIdExt;
use quiver_engine::StateStore;
use quiver_engine::durable::{StagingDir, sync_dir};
use quiver_engine::keys::entity_hash;

use super::{
    APPLIED_KEY, LEADER_TIME_KEY, LOG_HOLDS_KEY, LogHolds, RANGE_KEY, REQUEST_PREFIX,
    REQUEST_SLOT_PREFIX, RangeDesc, SNAPSHOTS_DIR, StateMachine, db_path, encode_applied,
    engine_io, invalid, write_current,
};
use crate::types::{
    Command, GroupId, LogId, RejectKind, ReplicaId, Response, StoredMembership, TypeConfig,
};

/// A split command's fields.
pub(super) struct SplitAt {
    pub child: GroupId,
    pub at: u64,
    pub start: u64,
    pub end: Option<u64>,
    pub version: u64,
}

/// The log id a split child's replicas start from: the split's index, in
/// term 0 (no leader of the new group has existed).
pub fn child_seed(index: u64) -> LogId {
    LogId::new(
        <TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(0, ReplicaId(0)),
        index,
    )
}

impl StateMachine {
    /// The refusal of a data command holding keys the shard does not own
    /// (by the range this replica has applied). Apply refuses such a
    /// command; a leader also checks before proposing, to refuse without a
    /// log round.
    pub fn wrong_shard(&self, command: &Command) -> Option<Response> {
        let range = self.shared.range.lock().clone()?;
        let stray = match command {
            Command::Write { rows, .. } => rows
                .iter()
                .map(|row| entity_hash(row.entity_key.as_bytes()))
                .find(|&hash| !range.contains(hash)),
            Command::Delete { entity_keys, .. } | Command::Invalidate { entity_keys, .. } => {
                entity_keys
                    .iter()
                    .map(|key| entity_hash(key.as_bytes()))
                    .find(|&hash| !range.contains(hash))
            }
            _ => None,
        }?;
        Some(Response::Rejected {
            kind: RejectKind::WrongShard,
            message: format!(
                "shard {}: key hash {stray:#018x} is outside its range {}",
                self.shared.group,
                describe(&range)
            ),
        })
    }

    /// Applies a split (see the module doc).
    pub(super) fn apply_split(
        &self,
        log_id: LogId,
        split: SplitAt,
        leader_ts_us: i64,
        meta_puts: quiver_engine::store::MetaPuts<'_>,
    ) -> io::Result<Response> {
        let current = self.range().unwrap_or(RangeDesc {
            start: split.start,
            end: split.end,
            version: split.version,
            children: Vec::new(),
        });
        if (current.start, current.end, current.version) != (split.start, split.end, split.version)
        {
            // Decided on another epoch: refused, not recorded (the request
            // id may be proposed again with the current one).
            return self.refuse_unrecorded(
                RejectKind::WrongShard,
                format!(
                    "shard {}: the split was decided on range version {} and the shard is at {} \
                     ({})",
                    self.shared.group,
                    split.version,
                    current.version,
                    describe(&current)
                ),
                meta_puts,
            );
        }
        if split.at <= split.start || split.end.is_some_and(|end| split.at >= end) {
            return self.refuse(
                Response::Rejected {
                    kind: RejectKind::Invalid,
                    message: format!(
                        "shard {}: {:#018x} is not inside its range {}",
                        self.shared.group,
                        split.at,
                        describe(&current)
                    ),
                },
                meta_puts,
            );
        }
        let membership = self.shared.applied.lock().1.clone();
        if membership.membership().get_joint_config().len() != 1 {
            // Passing: the same split may be proposed again once the
            // membership is uniform.
            return self.refuse_unrecorded(
                RejectKind::Conflict,
                format!(
                    "shard {}: its membership is changing; split it once that is done",
                    self.shared.group
                ),
                meta_puts,
            );
        }
        let handler = self.shared.split_handler.lock().clone().ok_or_else(|| {
            io::Error::other(format!(
                "shard {}: no split handler to create shard {}",
                self.shared.group, split.child
            ))
        })?;
        // The child's members are the parent's at the split. A replica
        // added after it (a later incarnation replaying the entry) is not
        // one: this node's replica of the child, if any, is the one that
        // split, and a second must not be built beside it.
        let replica = handler.replica();
        let member = membership
            .membership()
            .nodes()
            .any(|(id, _)| *id == replica);
        let child_here = if !member {
            tracing::info!(
                group = self.shared.group,
                child = split.child,
                %replica,
                "a replica that joined after the split replays it; the child is not built"
            );
            false
        } else if let Some(child_dir) = handler.prepare_child(split.child)? {
            if !child_dir.exists() {
                self.build_child(&child_dir, &split, log_id.index, &membership, leader_ts_us)?;
                crate::failpoint::failpoint("split.child_built");
            }
            true
        } else {
            // This node hosted the child under this id before (a replay
            // after the child moved away): it is never built again.
            false
        };
        let mut range = current;
        range.end = Some(split.at);
        range.version += 1;
        range.children.push((split.child, log_id.index));
        let range_bytes = postcard::to_stdvec(&range).map_err(io::Error::other)?;
        let mut puts = meta_puts.to_vec();
        puts.push((RANGE_KEY, Some(range_bytes.as_slice())));
        // The new range is published before the rows go: a reader checks
        // ownership, reads, then checks the range version, so a read that
        // finds the rows deleted always finds the version changed too.
        *self.shared.range.lock() = Some(range);
        self.store()
            .delete_hash_range_with(split.at, split.end, &puts)
            .map_err(engine_io)?;
        crate::failpoint::failpoint("split.parent_trimmed");
        // After the delete: a read that cached a row of the half given away
        // either finds the range changed or loses its entry here (the rows
        // live on in the child; the node's cache must not say they are
        // absent).
        self.shared.observer.replica_changed();
        tracing::info!(
            group = self.shared.group,
            child = split.child,
            at = format_args!("{:#018x}", split.at),
            index = log_id.index,
            "shard split"
        );
        if child_here {
            handler.child_created(split.child);
        }
        // No compaction is forced: both halves share the checkpoint's table
        // files (hard links, no second copy on disk) until RocksDB's own
        // compactions rewrite each side's files with its half only.
        Ok(Response::Split {
            child: split.child,
            index: log_id.index,
        })
    }

    /// Refuses an entry without recording the refusal against its request
    /// id (its position and leader time are recorded): the same request may
    /// be proposed again once what refused it has passed.
    fn refuse_unrecorded(
        &self,
        kind: RejectKind,
        message: String,
        meta_puts: quiver_engine::store::MetaPuts<'_>,
    ) -> io::Result<Response> {
        let unrecorded: Vec<(&[u8], Option<&[u8]>)> = meta_puts
            .iter()
            .copied()
            .filter(|(key, _)| {
                !key.starts_with(REQUEST_PREFIX) && !key.starts_with(REQUEST_SLOT_PREFIX)
            })
            .collect();
        self.store().put_meta(&unrecorded).map_err(engine_io)?;
        Ok(Response::Rejected { kind, message })
    }

    /// Builds the child's replica directory (see the module doc).
    fn build_child(
        &self,
        child_dir: &Path,
        split: &SplitAt,
        index: u64,
        membership: &StoredMembership,
        leader_ts_us: i64,
    ) -> io::Result<()> {
        let parent = child_dir
            .parent()
            .ok_or_else(|| invalid(format!("{} has no parent", child_dir.display())))?;
        let name = child_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let staging = StagingDir::create(parent.join(format!(".split-{name}")))?;
        let state_dir = staging.path().join("state");
        std::fs::create_dir_all(state_dir.join(SNAPSHOTS_DIR))?;
        let db = db_path(&state_dir, 0);
        self.store()
            .checkpoint_with_meta(&db, APPLIED_KEY)
            .map_err(engine_io)?;
        let seed = child_seed(index);
        {
            let options = quiver_engine::StoreOptions {
                load_catalog: false,
                ..self.shared.options.clone()
            };
            let store = StateStore::open(&db, options).map_err(engine_io)?;
            let range = RangeDesc {
                start: split.at,
                end: split.end,
                version: split.version + 1,
                children: Vec::new(),
            };
            let range_bytes = postcard::to_stdvec(&range).map_err(io::Error::other)?;
            let applied = encode_applied(
                &Some(seed),
                &StoredMembership::new(Some(seed), membership.membership().clone()),
            )?;
            let time = leader_ts_us.to_be_bytes();
            // The parent's consumers follow its range, so they follow the
            // child's part of it too: each holds the child's log from its
            // seed, or a busy child could purge entries before the
            // consumer's first read of them (a gap in a shipped log).
            let holds: LogHolds = self
                .shared
                .log_holds
                .lock()
                .keys()
                .map(|consumer| (consumer.clone(), seed.index))
                .collect();
            let holds_bytes = postcard::to_stdvec(&holds).map_err(io::Error::other)?;
            store
                .delete_hash_range_with(
                    split.start,
                    Some(split.at),
                    &[
                        (APPLIED_KEY, Some(applied.as_slice())),
                        (RANGE_KEY, Some(range_bytes.as_slice())),
                        (LEADER_TIME_KEY, Some(&time[..])),
                        (LOG_HOLDS_KEY, Some(holds_bytes.as_slice())),
                    ],
                )
                .map_err(engine_io)?;
            // Everything in fsynced table files: nothing replays this.
            store.flush().map_err(engine_io)?;
        }
        write_current(&state_dir, 0)?;
        crate::log_store::LogStore::seed(&staging.path().join("log"), seed)?;
        sync_dir(&state_dir)?;
        sync_dir(staging.path())?;
        std::fs::rename(staging.path(), child_dir)?;
        staging.keep();
        sync_dir(parent)?;
        Ok(())
    }
}

fn describe(range: &RangeDesc) -> String {
    match range.end {
        Some(end) => format!(
            "{:#018x}..{end:#018x} (version {})",
            range.start, range.version
        ),
        None => format!("{:#018x}..end (version {})", range.start, range.version),
    }
}
