//! openraft's log storage on the engine's segmented log.
//!
//! Entries are postcard-encoded, one log record each. The vote and the last
//! purged log id live next to the segments in small crc-checked files that
//! are replaced atomically (write, fsync, rename, fsync the directory).

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use parking_lot::Mutex;
use quiver_engine::seglog::{GroupCommitLog, LogError, LogOptions, SegmentedLog};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::types::{Entry, LogId, TypeConfig, Vote};

const VOTE_FILE: &str = "vote";
const PURGED_FILE: &str = "purged";

fn to_io(error: LogError) -> io::Error {
    match error {
        LogError::Io { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}

fn decode_entry(bytes: &[u8]) -> io::Result<Entry> {
    postcard::from_bytes(bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("log entry: {e}")))
}

/// The Raft log of one group replica. Cheap to clone; clones share the log
/// (the reader openraft asks for is a clone).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    log: GroupCommitLog,
    vote: Mutex<Option<Vote>>,
    purged: Mutex<Option<LogId>>,
    last: Mutex<Option<LogId>>,
    /// Who keeps entries past a purge, and the log size beyond which they
    /// no longer can.
    hold: Mutex<Option<(Arc<dyn PurgeHold>, u64)>>,
}

/// Keeps entries in the log that openraft no longer needs: change-stream
/// consumers that have not confirmed them yet (see [`crate::change_stream`]).
pub trait PurgeHold: Send + Sync + 'static {
    /// The highest index every consumer has confirmed (entries after it
    /// are kept); `None`: no consumer.
    fn held_index(&self) -> Option<u64>;
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl LogStore {
    /// Opens the log in `dir` (recovering a torn tail; refusing corruption).
    pub fn open(dir: impl AsRef<Path>, options: LogOptions) -> Result<Self, LogError> {
        let dir = dir.as_ref().to_path_buf();
        let log = SegmentedLog::open(&dir, options)?;
        let vote = read_small(&dir.join(VOTE_FILE)).map_err(|e| io_log_error(&dir, e))?;
        // Written as an `Option<LogId>` (by `purge` and `seed`): read as
        // one. (Read as a bare `LogId`, the option's tag shifted every field
        // by one: a restarted replica took (1, term, node) for its purge
        // point.)
        let purged: Option<LogId> = read_small::<Option<LogId>>(&dir.join(PURGED_FILE))
            .map_err(|e| io_log_error(&dir, e))?
            .flatten();
        let last = match log.last_index() {
            Some(index) => {
                let bytes = log
                    .get(index)?
                    .ok_or_else(|| io_log_error(&dir, io::Error::other("last entry missing")))?;
                Some(
                    decode_entry(&bytes)
                        .map_err(|e| io_log_error(&dir, e))?
                        .log_id(),
                )
            }
            None => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                log: GroupCommitLog::new(log)?,
                dir,
                vote: Mutex::new(vote),
                purged: Mutex::new(purged),
                last: Mutex::new(last),
                hold: Mutex::new(None),
            }),
        })
    }

    /// Creates an empty log in `dir` whose entries up to `log_id` count as
    /// purged: a split child's replica starts there (see
    /// `state_machine::split`).
    pub fn seed(dir: &Path, log_id: LogId) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        write_small(&dir.join(PURGED_FILE), &Some(log_id))
    }

    /// Bytes in segment files.
    pub fn bytes(&self) -> u64 {
        self.inner.log.with(|log| log.bytes())
    }

    /// Stops the background flusher (after flushing what is pending).
    pub fn close(&self) {
        self.inner.log.close();
    }

    /// Keeps the entries after `hold`'s index when openraft purges, while
    /// the log holds at most `held_bytes_max` bytes (past that a purge
    /// takes them, and a consumer reading them is told they are gone: a
    /// dead consumer cannot fill the disk).
    pub fn set_purge_hold(&self, hold: Arc<dyn PurgeHold>, held_bytes_max: u64) {
        *self.inner.hold.lock() = Some((hold, held_bytes_max));
    }

    /// The index of the first entry the log holds (or would hold next).
    pub fn first_index(&self) -> u64 {
        self.inner.log.with(|log| log.first_index())
    }

    /// The last purged log id: the log holds the entries after it.
    pub fn purged(&self) -> Option<LogId> {
        *self.inner.purged.lock()
    }

    /// The entries in `[start, end)` the log holds, at most `bytes_max` of
    /// payload (at least one entry). Entries purged or past the end are not
    /// returned.
    pub fn entries(&self, start: u64, end: u64, bytes_max: usize) -> io::Result<Vec<Entry>> {
        self.read_range(start, end, bytes_max)
    }

    /// How far a purge openraft asks for (up to `log_id`) goes: not past a
    /// consumer's hold, if the log is within its size cap and holds `log_id`
    /// itself (so every entry up to it is committed here: a follower that
    /// installed a snapshot past its log keeps nothing). `None`: nothing
    /// more may go.
    fn purge_target(&self, log_id: LogId) -> io::Result<Option<LogId>> {
        let Some((hold, held_bytes_max)) = self.inner.hold.lock().clone() else {
            return Ok(Some(log_id));
        };
        let Some(held) = hold.held_index() else {
            return Ok(Some(log_id));
        };
        let purged = *self.inner.purged.lock();
        if held >= log_id.index || purged.is_some_and(|p| held < p.index) {
            // Held past the purge, or the consumer lost entries already:
            // holding the rest would help nobody.
            return Ok(Some(log_id));
        }
        let bytes = self.bytes();
        if bytes > held_bytes_max {
            tracing::warn!(
                dir = %self.inner.dir.display(),
                bytes,
                held_bytes_max,
                held,
                "the log outgrew its hold cap: entries a change-stream consumer has not confirmed \
                 are purged; it must restart from a backup"
            );
            return Ok(Some(log_id));
        }
        let own = |index: u64| -> io::Result<Option<LogId>> {
            Ok(self
                .read_range(index, index + 1, usize::MAX)?
                .first()
                .map(RaftEntry::log_id))
        };
        if own(log_id.index)? != Some(log_id) {
            return Ok(Some(log_id));
        }
        if purged.is_some_and(|p| p.index == held) {
            return Ok(None);
        }
        Ok(Some(own(held)?.unwrap_or(log_id)))
    }

    fn read_range(&self, start: u64, end: u64, bytes_max: usize) -> io::Result<Vec<Entry>> {
        let read = || {
            self.inner
                .log
                .with(|log| log.range_limited(start, end, bytes_max))
                .map_err(to_io)
        };
        // Recent entries (the active segment, in the page cache) are read
        // in place; older ones (a lagging follower catching up) come through
        // sealed segments' maps and may fault pages in from disk: off the
        // async workers, which every group's heartbeats share.
        let cold = start < self.inner.log.with(|log| log.active_first_index());
        let payloads = if cold { blocking(read)? } else { read()? };
        payloads.iter().map(|p| decode_entry(p)).collect()
    }
}

fn io_log_error(dir: &Path, source: io::Error) -> LogError {
    LogError::Io {
        path: dir.to_path_buf(),
        source,
    }
}

/// Most entry bytes one replication append carries (far below the peer
/// message limit, 256 MiB, so it always fits; at least one entry).
pub const REPLICATION_PAYLOAD_BYTES_MAX: usize = 8 << 20;

/// Reads a small crc-checked postcard file; a missing file is `None`.
pub(crate) fn read_small<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let invalid = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {what}", path.display()),
        )
    };
    if bytes.len() < 4 {
        return Err(invalid("too short"));
    }
    let (crc, payload) = bytes.split_at(4);
    if crc32fast::hash(payload).to_le_bytes() != crc {
        return Err(invalid("crc32 mismatch"));
    }
    postcard::from_bytes(payload)
        .map(Some)
        .map_err(|e| invalid(&e.to_string()))
}

/// Replaces a small file atomically and durably.
pub(crate) fn write_small<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let payload = postcard::to_stdvec(value).map_err(io::Error::other)?;
    let mut bytes = crc32fast::hash(&payload).to_le_bytes().to_vec();
    bytes.extend_from_slice(&payload);
    quiver_engine::durable::write_atomic(path, &bytes)
}

/// Runs file-system work that may fsync without stalling the async workers
/// (heartbeats of every group share them).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn range_to_bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = range_to_bounds(&range);
        self.read_range(start, end, usize::MAX)
    }

    /// What replication sends a follower in one append: at most
    /// `REPLICATION_PAYLOAD_BYTES_MAX` of entries (openraft's own cap,
    /// `max_payload_entries`, counts entries, and entries can be megabytes:
    /// a lagging follower could be sent more than a peer message may hold,
    /// fail, be sent the same again, and never catch up).
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, io::Error> {
        self.read_range(start, end, REPLICATION_PAYLOAD_BYTES_MAX)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(*self.inner.vote.lock())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let purged = *self.inner.purged.lock();
        // After a crash between recording a purge and dropping the entries
        // it covers, the log may end before the purge point.
        let last = std::cmp::max(*self.inner.last.lock(), purged);
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        // openraft treats IO completion as a watermark: once this vote is
        // durable, every earlier append counts as durable too. Make it so.
        blocking(|| {
            self.inner.log.with(|log| log.sync()).map_err(to_io)?;
            write_small(&self.inner.dir.join(VOTE_FILE), vote)
        })?;
        *self.inner.vote.lock() = Some(*vote);
        Ok(())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut first = None;
        let mut last = None;
        let mut payloads = Vec::new();
        for entry in entries {
            let log_id = entry.log_id();
            first.get_or_insert(log_id.index);
            last = Some(log_id);
            payloads.push(postcard::to_stdvec(&entry).map_err(io::Error::other)?);
        }
        let Some(first) = first else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        let append = || {
            self.inner.log.append(
                first,
                payloads.iter().map(Vec::as_slice),
                Box::new(move |result| callback.io_completed(result)),
            )
        };
        // An append is a buffered write (the flusher thread fsyncs), cheaper
        // than handing the worker's queue to another thread; sealing a full
        // segment fsyncs inline, so that one goes through block_in_place.
        if self.inner.log.with(|log| log.next_append_seals()) {
            blocking(append)
        } else {
            append()
        }
        .map_err(to_io)?;
        *self.inner.last.lock() = last;
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |id| id.index + 1);
        blocking(|| self.inner.log.with(|log| log.truncate_from(from))).map_err(to_io)?;
        let mut last = self.inner.last.lock();
        if last.is_some_and(|l| l.index >= from) {
            *last = last_log_id;
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // openraft takes the entries up to `log_id` for gone; a consumer's
        // hold may keep some (reported as unpurged after a restart, which
        // openraft accepts: they are all covered by its snapshot).
        let Some(log_id) = self.purge_target(log_id)? else {
            return Ok(());
        };
        // Record the purge point first: after a crash the log may still hold
        // purged entries (harmless), never miss unpurged ones.
        blocking(|| write_small(&self.inner.dir.join(PURGED_FILE), &Some(log_id)))?;
        *self.inner.purged.lock() = Some(log_id);
        blocking(|| self.inner.log.with(|log| log.purge_to(log_id.index))).map_err(to_io)?;
        let mut last = self.inner.last.lock();
        if last.is_none_or(|l| l.index <= log_id.index) {
            *last = Some(log_id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Command, Proposal, TypeConfig};
    use proptest::prelude::*;
    use quiver_engine::{RowWrite, Value};

    fn entry(index: u64, key: &str, value: i64) -> Entry {
        Entry::new_normal(
            openraft::testing::log_id::<TypeConfig>(3, crate::ReplicaId(1), index),
            Proposal {
                request_id: (u128::from(index) << 64) | 7,
                leader_ts_us: 1_700_000_000_000_000,
                command: Command::Write {
                    view_id: 4,
                    rows: vec![RowWrite {
                        entity_key: key.to_owned(),
                        event_ts_us: 12,
                        values: vec![(1, Value::Int64(value)), (2, Value::String(key.into()))],
                    }],
                },
            },
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_purge_point_and_the_vote_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let purged = openraft::testing::log_id::<TypeConfig>(7, crate::ReplicaId(3), 40);
        {
            let mut log = LogStore::open(dir.path(), LogOptions::default()).unwrap();
            let vote = Vote::new(7, crate::ReplicaId(3));
            log.save_vote(&vote).await.unwrap();
            log.purge(purged).await.unwrap();
            log.close();
        }
        let mut log = LogStore::open(dir.path(), LogOptions::default()).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(purged));
        assert_eq!(state.last_log_id, Some(purged));
        assert_eq!(
            log.read_vote().await.unwrap(),
            Some(Vote::new(7, crate::ReplicaId(3)))
        );
        // A seeded log (a split child's) reads back the same way.
        let seeded = dir.path().join("seeded");
        LogStore::seed(&seeded, purged).unwrap();
        let mut log = LogStore::open(&seeded, LogOptions::default()).unwrap();
        assert_eq!(
            log.get_log_state().await.unwrap().last_purged_log_id,
            Some(purged)
        );
    }

    // Log records come back from disk: whatever they hold, decoding gives an
    // entry or a typed error, never a panic or an allocation beyond the
    // input (postcard checks every length against the bytes left).
    // `PROPTEST_CASES=1000000 cargo test --workspace --lib -- log_store` for
    // a long run.
    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_entry_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..512)
        ) {
            let _ = decode_entry(&bytes);
        }

        #[test]
        fn mutated_entries_never_panic_the_entry_decoder(
            index in 1u64..u64::MAX, key in ".{0,40}", value in any::<i64>(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            let original = entry(index, &key, value);
            let mut bytes = postcard::to_stdvec(&original).unwrap();
            let decoded = decode_entry(&bytes).unwrap();
            prop_assert_eq!(&decoded.log_id, &original.log_id);
            for (at, mask) in flips {
                let at = at % bytes.len();
                bytes[at] ^= mask;
            }
            let _ = decode_entry(&bytes);
            let _ = decode_entry(&bytes[..cut % (bytes.len() + 1)]);
        }
    }
}
