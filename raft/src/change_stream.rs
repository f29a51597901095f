//! A shard's change stream: its committed entries, read from the Raft log
//! at a resumable position, each with the time it counts at. Backup
//! shipping reads it (issue 12), cross-region replication will.
//!
//! - **Position.** A [`ChangePosition`] is the log id of the last entry a
//!   consumer has, with the shard's leader time after it. Reading from it
//!   returns the entries after it, at most up to what this replica has
//!   applied (so only committed ones), and the position after them. The
//!   log id is checked against the log: a position whose entry the log
//!   holds under another term is [`ChangeStreamError::Diverged`] (the
//!   consumer read a different history, for example another cluster's).
//! - **Time.** An entry counts at its leader's clock or the shard's leader
//!   time before it, whichever is later (as the state machine applies it:
//!   [`crate::StateMachine::leader_time_us`]), so times in the stream never
//!   go back and a cut at time T is one position.
//! - **Holds.** A consumer confirms what it has with [`Command::HoldLog`],
//!   replicated like any entry, so every replica (and any later leader)
//!   keeps the entries after the lowest confirmed index when openraft
//!   purges its log, while the log is within `log_hold_bytes_max`
//!   ([`crate::log_store::PurgeHold`]). Past the cap, or on a replica that
//!   caught up by snapshot, the entries go, and a consumer asking for them
//!   is told [`ChangeStreamError::Purged`]: it must restart from a backup.
//!
//! Architecture invariant: like the rest of this crate, it knows the log
//! and the state machine, never the transport or the consumers.

use openraft::EntryPayload;
use openraft::entry::RaftEntry;
use serde::{Deserialize, Serialize};

use crate::log_store::LogStore;
use crate::state_machine::StateMachine;
use crate::types::{Command, LogId, RequestId};

/// Most consumers holding one shard's log.
pub const LOG_CONSUMERS_MAX: usize = 16;
/// Longest consumer name, in bytes.
pub const LOG_CONSUMER_NAME_BYTES_MAX: usize = 64;

/// Whether `name` may name a consumer: 1 to
/// [`LOG_CONSUMER_NAME_BYTES_MAX`] bytes of ASCII letters, digits, `.`, `_`
/// and `-`.
pub fn check_consumer_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > LOG_CONSUMER_NAME_BYTES_MAX {
        return Err(format!(
            "a log consumer's name has 1 to {LOG_CONSUMER_NAME_BYTES_MAX} bytes, not {}",
            name.len()
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "log consumer {name:?}: only ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Where a consumer is in a shard's stream: after the entry `log_id`
/// (`None`: before the first entry), with the shard's leader time there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangePosition {
    /// The last entry the consumer has.
    pub log_id: Option<LogId>,
    /// The shard's leader time after it (µs).
    pub leader_ts_us: i64,
}

impl ChangePosition {
    /// The index of the last entry the consumer has (0 before any).
    pub fn index(&self) -> u64 {
        self.log_id.map_or(0, |id| id.index)
    }
}

/// One committed command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEntry {
    /// Its place in the shard's log.
    pub log_id: LogId,
    /// The time it counts at (µs): never below an earlier entry's.
    pub leader_ts_us: i64,
    /// Its request id (0: none).
    pub request_id: RequestId,
    /// What it does.
    pub command: Command,
}

/// What one read returns.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeBatch {
    /// The commands after the position read from, in log order (blank and
    /// membership entries are passed over).
    pub entries: Vec<ChangeEntry>,
    /// The position after them: where the next read starts.
    pub next: ChangePosition,
}

/// How much one read returns at most (at least one entry, whatever its
/// size, so a consumer always makes progress).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeLimits {
    /// Log entries read.
    pub entries_max: u64,
    /// Encoded entry bytes read.
    pub bytes_max: usize,
}

impl Default for ChangeLimits {
    fn default() -> Self {
        ChangeLimits {
            entries_max: 4096,
            bytes_max: 4 << 20,
        }
    }
}

/// Why a read cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ChangeStreamError {
    /// The entries after the position are gone from this replica's log.
    #[error(
        "the entries after index {after} are purged from this replica's log (it starts after \
         {purged}): the consumer must restart from a backup"
    )]
    Purged {
        /// The position's index.
        after: u64,
        /// The log's purge point.
        purged: u64,
    },
    /// The log holds another entry at the position's index.
    #[error("position {position} is not in this shard's log (it holds {found:?} there)")]
    Diverged {
        /// The position.
        position: LogId,
        /// What the log holds at its index.
        found: Option<LogId>,
    },
    /// The position is past what this replica applied.
    #[error("position {position} is past what this replica applied ({applied:?})")]
    Ahead {
        /// The position.
        position: LogId,
        /// This replica's applied log id.
        applied: Option<LogId>,
    },
    /// Reading the log failed.
    #[error("reading the log: {0}")]
    Io(#[from] std::io::Error),
}

/// One replica's change stream: its log, read up to what its state machine
/// applied.
#[derive(Debug, Clone)]
pub struct ChangeStream {
    log: LogStore,
    state: StateMachine,
}

impl ChangeStream {
    /// The stream of the replica with this log and state machine.
    pub fn new(log: LogStore, state: StateMachine) -> ChangeStream {
        ChangeStream { log, state }
    }

    /// Where the replica's state is now: a checkpoint taken now resumes the
    /// stream here. (Racy against apply; a checkpoint carries its own
    /// applied log id and leader time, which is what a backup records.)
    pub fn position(&self) -> ChangePosition {
        let (log_id, leader_ts_us) = self.state.applied_position();
        ChangePosition {
            log_id,
            leader_ts_us,
        }
    }

    /// The oldest position the stream can be read from: the start of a log
    /// never purged, else the last purged entry (a split child's seed, see
    /// `state_machine::child_seed`, until its first purge), with the leader
    /// time of the first command after it (nothing changed the state in
    /// between; 0 if no command is near, a time no later entry is below).
    /// A consumer that starts here misses nothing the replica still has,
    /// so a backup taken before it began is replayable. Reads the log on
    /// the calling thread.
    pub fn first_position(&self) -> ChangePosition {
        let mut start = ChangePosition {
            log_id: self.log.purged(),
            leader_ts_us: 0,
        };
        // The first entries are often a leader's blank entry and
        // memberships, which carry no time: look a little further.
        let limits = ChangeLimits {
            entries_max: 64,
            bytes_max: 1 << 20,
        };
        if let Some(first) = self
            .read(&start, limits)
            .ok()
            .and_then(|batch| batch.entries.into_iter().next())
        {
            start.leader_ts_us = first.leader_ts_us;
        }
        start
    }

    /// The committed commands after `from`, within `limits`. Reads the log
    /// on the calling thread (it may touch the disk).
    pub fn read(
        &self,
        from: &ChangePosition,
        limits: ChangeLimits,
    ) -> Result<ChangeBatch, ChangeStreamError> {
        read(&self.log, self.state.applied(), from, limits)
    }
}

/// The committed commands of `log` after `from`, up to `applied`.
pub fn read(
    log: &LogStore,
    applied: Option<LogId>,
    from: &ChangePosition,
    limits: ChangeLimits,
) -> Result<ChangeBatch, ChangeStreamError> {
    let purged = log.purged();
    let start = match from.log_id {
        // A log never purged: from its first entry, wherever it is.
        None => log.first_index(),
        Some(position) => {
            if applied.is_none_or(|a| a.index < position.index) {
                return Err(ChangeStreamError::Ahead { position, applied });
            }
            match purged {
                Some(p) if p.index > position.index => {
                    return Err(ChangeStreamError::Purged {
                        after: position.index,
                        purged: p.index,
                    });
                }
                Some(p) if p.index == position.index => {
                    if p != position {
                        return Err(ChangeStreamError::Diverged {
                            position,
                            found: Some(p),
                        });
                    }
                }
                _ => {
                    let found = log
                        .entries(position.index, position.index + 1, usize::MAX)?
                        .first()
                        .map(RaftEntry::log_id);
                    if found != Some(position) {
                        return Err(ChangeStreamError::Diverged { position, found });
                    }
                }
            }
            position.index + 1
        }
    };
    if from.log_id.is_none()
        && let Some(p) = purged
    {
        return Err(ChangeStreamError::Purged {
            after: 0,
            purged: p.index,
        });
    }
    let mut next = *from;
    let Some(applied) = applied else {
        return Ok(ChangeBatch {
            entries: Vec::new(),
            next,
        });
    };
    let end = applied
        .index
        .saturating_add(1)
        .min(start.saturating_add(limits.entries_max.max(1)));
    if start >= end {
        return Ok(ChangeBatch {
            entries: Vec::new(),
            next,
        });
    }
    let raw = log.entries(start, end, limits.bytes_max.max(1))?;
    let mut entries = Vec::with_capacity(raw.len());
    let mut expected = start;
    for entry in raw {
        let log_id = entry.log_id();
        if log_id.index != expected {
            // A purge raced the read: what is gone is gone.
            return Err(ChangeStreamError::Purged {
                after: next.index(),
                purged: log.purged().map_or(log_id.index, |p| p.index),
            });
        }
        expected += 1;
        if let EntryPayload::Normal(proposal) = entry.payload {
            let leader_ts_us = proposal.leader_ts_us.max(next.leader_ts_us);
            next.leader_ts_us = leader_ts_us;
            entries.push(ChangeEntry {
                log_id,
                leader_ts_us,
                request_id: proposal.request_id,
                command: proposal.command,
            });
        }
        next.log_id = Some(log_id);
    }
    if expected == start {
        // The first entry wanted is gone (purged between the check and the
        // read).
        return Err(ChangeStreamError::Purged {
            after: next.index(),
            purged: log.purged().map_or(0, |p| p.index),
        });
    }
    Ok(ChangeBatch { entries, next })
}
