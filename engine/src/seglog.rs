//! The segmented log: the durable Raft log of one shard replica.
//!
//! A directory of append-only segment files named by the index of their first
//! entry (`00000000000000000042.seg`). A segment starts with a 16-byte header
//! (`QLOG`, format version, first index) followed by records
//! `len: u32 LE | crc32(payload): u32 LE | payload`; entry indexes are
//! implicit (first index + position), so the log is always contiguous.
//!
//! Only the last segment is written; a full segment is fsynced and sealed,
//! after which it is read through a memory map (sealed segments are what
//! backup ships). Only a truncation (Raft overwriting a follower's
//! uncommitted tail) writes to a sealed segment again: it drops the map, cuts
//! the file and makes the segment active. The active segment is read with
//! positioned reads.
//!
//! Recovery scans every record and checks its crc. A bad record at the very
//! end of the last segment is a torn write (the process died mid-append, so
//! the entry was never acknowledged): the tail is cut off. A bad record
//! anywhere else means the log is corrupt in the middle, and opening fails
//! with [`LogError::Corrupt`] instead of silently dropping acknowledged
//! entries.
//!
//! Purging (after a snapshot) drops whole segments and records the new first
//! index in a small `first_index` file, written atomically before any segment
//! is deleted. Restarting an empty log at a later index (after a snapshot
//! install) and truncating everything rewrite that file the same way.
//!
//! [`GroupCommitLog`] adds group commit on top: appends return at once, one
//! background thread fsyncs and then runs the callbacks of every append the
//! fsync covered.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use parking_lot::{Condvar, Mutex};

const SEGMENT_MAGIC: &[u8; 4] = b"QLOG";
const SEGMENT_VERSION: u32 = 1;
const SEGMENT_HEADER_BYTES: u64 = 16;
const RECORD_HEADER_BYTES: u64 = 8;
const SEGMENT_SUFFIX: &str = ".seg";
const FIRST_INDEX_FILE: &str = "first_index";

/// How a log is opened.
#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    /// A segment at least this large is sealed and a new one started.
    pub segment_bytes_max: u64,
    /// The largest payload one record may carry; larger lengths found on disk
    /// are corruption.
    pub record_bytes_max: u32,
    /// fsync before [`GroupCommitLog`] reports appends durable. Off, appends
    /// survive a process crash (page cache) but not a power loss.
    pub sync: bool,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            segment_bytes_max: 64 << 20,
            record_bytes_max: 64 << 20,
            sync: true,
        }
    }
}

/// Errors of the segmented log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The file system failed.
    #[error("log {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A record or segment that fails its checks where it cannot be a torn
    /// tail. The log refuses to open: the replica must be rebuilt from a
    /// snapshot (its peers still hold the entries).
    #[error(
        "log segment {path} is corrupt at byte {offset}: {reason}; refusing to open (rebuild this replica from its peers)"
    )]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the bad record or header.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An append that does not continue the log.
    #[error("log append at index {got}, the log expects index {expected}")]
    OutOfOrder {
        /// The next index of the log.
        expected: u64,
        /// The index of the first appended entry.
        got: u64,
    },
    /// A payload over [`LogOptions::record_bytes_max`].
    #[error("log record of {bytes} bytes exceeds record_bytes_max ({max})")]
    RecordTooLarge {
        /// The payload size.
        bytes: usize,
        /// The limit.
        max: u32,
    },
}

/// Result with [`LogError`].
pub type LogResult<T> = std::result::Result<T, LogError>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The active segment as of a moment: what an fsync covers.
#[derive(Debug, Clone)]
pub struct SyncTarget {
    /// The segment file.
    pub file: Arc<File>,
    /// Its path, for errors.
    pub path: PathBuf,
    /// Its first index.
    pub first_index: u64,
    /// Its length when the target was taken.
    pub len: u64,
}

/// One segment file.
struct Segment {
    first_index: u64,
    path: PathBuf,
    /// Byte offset of each record, entry `first_index + i` at `offsets[i]`.
    offsets: Vec<u64>,
    /// Bytes in the file (header included).
    len: u64,
    /// Open for reads and (when active) appends.
    file: Arc<File>,
    /// Sealed segments are read through a map.
    map: Option<Mmap>,
}

impl Segment {
    fn next_index(&self) -> u64 {
        self.first_index + self.offsets.len() as u64
    }

    fn contains(&self, index: u64) -> bool {
        index >= self.first_index && index < self.next_index()
    }

    fn record_bytes(&self, index: u64) -> LogResult<Vec<u8>> {
        let position = (index - self.first_index) as usize;
        let start = self.offsets[position];
        let end = self.offsets.get(position + 1).copied().unwrap_or(self.len);
        let corrupt = |reason: String| LogError::Corrupt {
            path: self.path.clone(),
            offset: start,
            reason,
        };
        let record = match &self.map {
            Some(map) => map
                .get(start as usize..end as usize)
                .ok_or_else(|| corrupt("record outside the mapped file".into()))?
                .to_vec(),
            None => {
                let mut buffer = vec![0; (end - start) as usize];
                self.file
                    .read_exact_at(&mut buffer, start)
                    .map_err(io_err(&self.path))?;
                buffer
            }
        };
        match parse_record(&record, u32::MAX) {
            Parsed::Record { payload, .. } => Ok(payload.to_vec()),
            Parsed::Truncated => Err(corrupt("record shorter than its length".into())),
            Parsed::Bad(reason) => Err(corrupt(reason)),
        }
    }

    fn seal(&mut self) -> LogResult<()> {
        self.file.sync_data().map_err(io_err(&self.path))?;
        // SAFETY: while mapped, a sealed segment is not written by this
        // process (truncation and deletion drop the map first), and no other
        // process writes a replica's log directory.
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(&*self.file) }.map_err(io_err(&self.path))?;
        self.map = Some(map);
        Ok(())
    }
}

enum Parsed<'a> {
    Record {
        payload: &'a [u8],
        bytes: u64,
    },
    /// The bytes end before the record does.
    Truncated,
    /// The record is complete but wrong.
    Bad(String),
}

fn parse_record(bytes: &[u8], record_bytes_max: u32) -> Parsed<'_> {
    if bytes.len() < RECORD_HEADER_BYTES as usize {
        return Parsed::Truncated;
    }
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if len > record_bytes_max {
        return Parsed::Bad(format!(
            "record length {len} over the limit {record_bytes_max}"
        ));
    }
    let end = RECORD_HEADER_BYTES as usize + len as usize;
    let Some(payload) = bytes.get(RECORD_HEADER_BYTES as usize..end) else {
        return Parsed::Truncated;
    };
    let actual = record_crc(len, payload);
    if actual != crc {
        return Parsed::Bad(format!(
            "crc32 mismatch (stored {crc:08x}, computed {actual:08x})"
        ));
    }
    Parsed::Record {
        payload,
        bytes: end as u64,
    }
}

fn record_crc(len: u32, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

fn encode_record(payload: &[u8], out: &mut Vec<u8>) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&record_crc(len, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

fn segment_name(first_index: u64) -> String {
    format!("{first_index:020}{SEGMENT_SUFFIX}")
}

fn sync_dir(dir: &Path) -> LogResult<()> {
    crate::durable::sync_dir(dir).map_err(io_err(dir))
}

/// The durable, contiguous log of one replica. Not thread-safe by itself: see
/// [`GroupCommitLog`] for the shared, group-committing wrapper.
pub struct SegmentedLog {
    dir: PathBuf,
    options: LogOptions,
    /// Oldest first; the last one is the active (writable) segment.
    segments: Vec<Segment>,
    /// The first readable index (entries before it are purged).
    first_index: u64,
    /// The index the next append must have.
    next_index: u64,
    /// Bytes of torn tail cut off when the log was opened.
    recovered_torn_bytes: u64,
    /// The synced mark (`SYNCED_MARK_FILE`), rewritten after every fsync.
    mark: File,
}

/// Where the log records, after each fsync, how far the active segment is
/// durable: `(first index of the segment, byte length synced)` as one
/// crc'd record. It is written after the fsync returns and never fsynced
/// itself, so whatever of it reaches the disk is a lower bound of what was
/// synced. Recovery uses it to tell a torn tail from corruption: a bad
/// record past the mark was never acknowledged (the pages of an append can
/// reach the disk out of order, leaving garbage before valid-looking
/// bytes), one before it is damage to acknowledged data.
const SYNCED_MARK_FILE: &str = "synced";

impl std::fmt::Debug for SegmentedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentedLog")
            .field("dir", &self.dir)
            .field("first_index", &self.first_index)
            .field("next_index", &self.next_index)
            .field("segments", &self.segments.len())
            .finish()
    }
}

impl SegmentedLog {
    /// Opens (creating if needed) the log in `dir`, recovering from a torn
    /// tail and refusing a log that is corrupt in the middle.
    pub fn open(dir: impl AsRef<Path>, options: LogOptions) -> LogResult<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let purged_first = read_first_index(&dir)?;

        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else {
                continue;
            };
            let first: u64 = stem.parse().map_err(|_| LogError::Corrupt {
                path: entry.path(),
                offset: 0,
                reason: "segment file name is not an index".into(),
            })?;
            names.push((first, entry.path()));
        }
        names.sort();

        let synced = read_synced_mark(&dir);
        let mut segments: Vec<Segment> = Vec::with_capacity(names.len());
        let count = names.len();
        let mut recovered_torn_bytes = 0;
        for (position, (first_index, path)) in names.into_iter().enumerate() {
            let is_last = position + 1 == count;
            let synced_bytes = synced
                .filter(|&(segment, _)| segment == first_index)
                .map(|(_, bytes)| bytes);
            let (segment, torn) =
                recover_segment(first_index, path, is_last, synced_bytes, options)?;
            recovered_torn_bytes += torn;
            if let Some(previous) = segments.last()
                && previous.next_index() != segment.first_index
            {
                return Err(LogError::Corrupt {
                    path: segment.path.clone(),
                    offset: 0,
                    reason: format!(
                        "gap in the log: previous segment ends before index {}, this one starts at {}",
                        previous.next_index(),
                        segment.first_index
                    ),
                });
            }
            segments.push(segment);
        }

        let mark_path = dir.join(SYNCED_MARK_FILE);
        let mark = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&mark_path)
            .map_err(io_err(&mark_path))?;
        let mut log = SegmentedLog {
            dir,
            options,
            first_index: 0,
            next_index: 0,
            segments,
            recovered_torn_bytes,
            mark,
        };
        let first_segment = log.segments.first().map(|s| s.first_index);
        log.next_index = log.segments.last().map_or(0, Segment::next_index);
        log.first_index = match (purged_first, first_segment) {
            (Some(purged), _) => purged,
            (None, Some(first)) => first,
            (None, None) => 0,
        };
        // A purge that crashed between recording the first index and deleting
        // the segments it covers: finish it.
        log.drop_segments_before(log.first_index)?;
        if log.segments.is_empty() {
            log.next_index = log.first_index;
        } else if log.segments[0].first_index > log.first_index {
            return Err(LogError::Corrupt {
                path: log.segments[0].path.clone(),
                offset: 0,
                reason: format!(
                    "log should start at index {} but its first segment starts at {}",
                    log.first_index, log.segments[0].first_index
                ),
            });
        }
        // Only the last segment stays writable; every other one is sealed.
        let sealed = log.segments.len().saturating_sub(1);
        for segment in &mut log.segments[..sealed] {
            segment.seal()?;
        }
        Ok(log)
    }

    /// The first readable index.
    pub fn first_index(&self) -> u64 {
        self.first_index
    }

    /// The index the next append must carry (one past the last entry).
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// The last entry's index, if the log holds any.
    pub fn last_index(&self) -> Option<u64> {
        (self.next_index > self.first_index).then(|| self.next_index - 1)
    }

    /// Bytes of torn tail cut off when the log was opened.
    pub fn recovered_torn_bytes(&self) -> u64 {
        self.recovered_torn_bytes
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Total bytes in segment files.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Whether the next append starts a new segment, which fsyncs the full
    /// one first (callers on an async runtime move such appends off it).
    pub fn next_append_seals(&self) -> bool {
        self.segments
            .last()
            .is_none_or(|s| s.len >= self.options.segment_bytes_max)
    }

    /// Appends entries `first_index, first_index + 1, ...`. Not durable until
    /// [`Self::sync`]. An empty log accepts any start index at or after its
    /// first index (after a snapshot the log restarts past it).
    pub fn append<'a>(
        &mut self,
        first_index: u64,
        payloads: impl IntoIterator<Item = &'a [u8]>,
    ) -> LogResult<()> {
        let is_empty = self.next_index == self.first_index;
        if first_index != self.next_index && !(is_empty && first_index > self.first_index) {
            return Err(LogError::OutOfOrder {
                expected: self.next_index,
                got: first_index,
            });
        }
        if is_empty && first_index != self.next_index {
            self.drop_segments_before(u64::MAX)?;
            self.first_index = first_index;
            self.next_index = first_index;
            write_first_index(&self.dir, first_index)?;
        }
        let mut buffer = Vec::new();
        let mut offsets = Vec::new();
        for payload in payloads {
            if payload.len() > self.options.record_bytes_max as usize {
                return Err(LogError::RecordTooLarge {
                    bytes: payload.len(),
                    max: self.options.record_bytes_max,
                });
            }
            offsets.push(buffer.len() as u64);
            encode_record(payload, &mut buffer);
        }
        if offsets.is_empty() {
            return Ok(());
        }
        if self.next_append_seals() {
            if let Some(active) = self.segments.last_mut() {
                active.seal()?;
            }
            let segment = create_segment(&self.dir, self.next_index)?;
            self.segments.push(segment);
        }
        let active = self
            .segments
            .last_mut()
            .expect("a segment was just ensured");
        let base = active.len;
        active
            .file
            .write_all_at(&buffer, base)
            .map_err(io_err(&active.path))?;
        active.offsets.extend(offsets.iter().map(|o| base + o));
        active.len += buffer.len() as u64;
        self.next_index += offsets.len() as u64;
        Ok(())
    }

    /// What an fsync must cover to make every append so far durable
    /// (sealed segments were synced when sealed).
    pub fn sync_target(&self) -> Option<SyncTarget> {
        self.segments.last().map(|s| SyncTarget {
            file: s.file.clone(),
            path: s.path.clone(),
            first_index: s.first_index,
            len: s.len,
        })
    }

    /// Makes every append so far durable.
    pub fn sync(&self) -> LogResult<()> {
        if let Some(target) = self.sync_target() {
            target.file.sync_data().map_err(io_err(&target.path))?;
            self.mark_synced(&target);
        }
        Ok(())
    }

    /// Records that `target` was fsynced (see `SYNCED_MARK_FILE`). Not
    /// fsynced itself, and a failure only costs recovery its precision.
    pub fn mark_synced(&self, target: &SyncTarget) {
        let mut payload = [0u8; 16];
        payload[..8].copy_from_slice(&target.first_index.to_le_bytes());
        payload[8..].copy_from_slice(&target.len.to_le_bytes());
        let mut record = Vec::with_capacity(24);
        encode_record(&payload, &mut record);
        if let Err(e) = self.mark.write_all_at(&record, 0) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "log: cannot write the synced mark");
        }
    }

    /// The payload of entry `index`, or `None` outside `[first, next)`.
    pub fn get(&self, index: u64) -> LogResult<Option<Vec<u8>>> {
        if index < self.first_index || index >= self.next_index {
            return Ok(None);
        }
        let position = self
            .segments
            .partition_point(|s| s.first_index <= index)
            .saturating_sub(1);
        match self.segments.get(position) {
            Some(segment) if segment.contains(index) => segment.record_bytes(index).map(Some),
            _ => Ok(None),
        }
    }

    /// The first index held by the active (unsealed) segment: entries below
    /// it are in sealed segments, read through maps whose pages may have to
    /// come from disk.
    pub fn active_first_index(&self) -> u64 {
        self.segments
            .last()
            .map_or(self.next_index, |segment| segment.first_index)
    }

    /// The payloads of `[start, end)` clipped to the log, in order.
    pub fn range(&self, start: u64, end: u64) -> LogResult<Vec<Vec<u8>>> {
        self.range_limited(start, end, usize::MAX)
    }

    /// Like [`Self::range`], but stops once the payloads read add up to
    /// `bytes_max` (the first one is returned whatever its size).
    pub fn range_limited(&self, start: u64, end: u64, bytes_max: usize) -> LogResult<Vec<Vec<u8>>> {
        let start = start.max(self.first_index);
        let end = end.min(self.next_index);
        let mut out = Vec::with_capacity(end.saturating_sub(start).min(1024) as usize);
        let mut bytes = 0usize;
        for index in start..end {
            if !out.is_empty() && bytes >= bytes_max {
                break;
            }
            match self.get(index)? {
                Some(payload) => {
                    bytes = bytes.saturating_add(payload.len());
                    out.push(payload);
                }
                None => break,
            }
        }
        Ok(out)
    }

    /// Removes every entry at or after `index` (a Raft log conflict). Durable
    /// when it returns.
    pub fn truncate_from(&mut self, index: u64) -> LogResult<()> {
        if index >= self.next_index {
            return Ok(());
        }
        // Newest first, so a crash midway leaves a contiguous prefix.
        while let Some(last) = self.segments.last() {
            if last.first_index < index {
                break;
            }
            let segment = self.segments.pop().expect("last exists");
            drop(segment.map);
            std::fs::remove_file(&segment.path).map_err(io_err(&segment.path))?;
        }
        if let Some(last) = self.segments.last_mut() {
            // The last segment is the writable one again: appends must not
            // land behind a map that does not cover them.
            last.map = None;
        }
        if let Some(last) = self.segments.last_mut()
            && last.contains(index)
        {
            let cut = last.offsets[(index - last.first_index) as usize];
            last.file.set_len(cut).map_err(io_err(&last.path))?;
            last.file.sync_all().map_err(io_err(&last.path))?;
            last.offsets.truncate((index - last.first_index) as usize);
            last.len = cut;
        }
        sync_dir(&self.dir)?;
        self.next_index = index;
        if self.first_index > index {
            self.first_index = index;
            write_first_index(&self.dir, index)?;
        }
        // The mark may say more was synced than the log now holds. It must
        // come down, durably, before anything is appended past the cut: a
        // torn append there would otherwise look like damage to synced data.
        if let Some(target) = self.sync_target() {
            self.mark_synced(&target);
            self.mark.sync_data().map_err(io_err(&self.dir))?;
        }
        Ok(())
    }

    /// Removes every entry at or before `index` (compacted into a snapshot).
    /// Durable when it returns. Purging past the end leaves an empty log whose
    /// next append starts after `index`.
    pub fn purge_to(&mut self, index: u64) -> LogResult<()> {
        let new_first = index.saturating_add(1);
        if new_first <= self.first_index {
            return Ok(());
        }
        write_first_index(&self.dir, new_first)?;
        self.first_index = new_first;
        if self.next_index < new_first {
            self.next_index = new_first;
        }
        self.drop_segments_before(new_first)
    }

    /// Deletes segments whose entries all lie before `index`.
    fn drop_segments_before(&mut self, index: u64) -> LogResult<()> {
        let mut removed = false;
        while self
            .segments
            .first()
            .is_some_and(|s| s.next_index() <= index)
        {
            let segment = self.segments.remove(0);
            drop(segment.map);
            std::fs::remove_file(&segment.path).map_err(io_err(&segment.path))?;
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

fn create_segment(dir: &Path, first_index: u64) -> LogResult<Segment> {
    let path = dir.join(segment_name(first_index));
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let mut header = Vec::with_capacity(SEGMENT_HEADER_BYTES as usize);
    header.extend_from_slice(SEGMENT_MAGIC);
    header.extend_from_slice(&SEGMENT_VERSION.to_le_bytes());
    header.extend_from_slice(&first_index.to_le_bytes());
    file.write_all(&header).map_err(io_err(&path))?;
    file.sync_all().map_err(io_err(&path))?;
    sync_dir(dir)?;
    Ok(Segment {
        first_index,
        path,
        offsets: Vec::new(),
        len: SEGMENT_HEADER_BYTES,
        file: Arc::new(file),
        map: None,
    })
}

/// Scans one segment. Returns it and the number of torn bytes cut off.
fn recover_segment(
    first_index: u64,
    path: PathBuf,
    is_last: bool,
    synced_bytes: Option<u64>,
    options: LogOptions,
) -> LogResult<(Segment, u64)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    let corrupt = |offset: u64, reason: String| LogError::Corrupt {
        path: path.clone(),
        offset,
        reason,
    };
    if bytes.len() < SEGMENT_HEADER_BYTES as usize {
        if is_last {
            // Died while creating the segment: nothing in it was acknowledged.
            file.set_len(0).map_err(io_err(&path))?;
            drop(file);
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            let segment =
                create_segment(path.parent().unwrap_or_else(|| Path::new(".")), first_index)?;
            return Ok((segment, bytes.len() as u64));
        }
        return Err(corrupt(0, "segment header is incomplete".into()));
    }
    if &bytes[0..4] != SEGMENT_MAGIC {
        return Err(corrupt(0, "not a Quiver log segment (bad magic)".into()));
    }
    let version = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if version != SEGMENT_VERSION {
        return Err(corrupt(
            4,
            format!("unknown segment format version {version}"),
        ));
    }
    let mut stored_first = [0u8; 8];
    stored_first.copy_from_slice(&bytes[8..16]);
    if u64::from_le_bytes(stored_first) != first_index {
        return Err(corrupt(
            8,
            format!(
                "header says first index {}, file name says {first_index}",
                u64::from_le_bytes(stored_first)
            ),
        ));
    }

    let mut offsets = Vec::new();
    let mut offset = SEGMENT_HEADER_BYTES;
    let total = bytes.len() as u64;
    while offset < total {
        match parse_record(&bytes[offset as usize..], options.record_bytes_max) {
            Parsed::Record { bytes: size, .. } => {
                offsets.push(offset);
                offset += size;
            }
            // Damage inside what the mark says was fsynced (so acknowledged):
            // corruption, not a tail, whatever follows.
            Parsed::Truncated | Parsed::Bad(_)
                if is_last && synced_bytes.is_some_and(|synced| offset < synced) =>
            {
                return Err(corrupt(
                    offset,
                    format!(
                        "a bad record inside the part of the segment synced before the crash ({} bytes)",
                        synced_bytes.unwrap_or(0)
                    ),
                ));
            }
            Parsed::Truncated if is_last => break,
            // Past the mark, nothing was acknowledged: the rest is a tail
            // even when valid-looking bytes follow (pages of an append can
            // reach the disk out of order). Without a mark (a log older than
            // it, or a mark that never reached the disk), only a bad last
            // record is a tail.
            Parsed::Bad(_)
                if is_last
                    && (synced_bytes.is_some()
                        || bad_record_is_tail(&bytes, offset, options.record_bytes_max)) =>
            {
                break;
            }
            Parsed::Truncated => {
                return Err(corrupt(
                    offset,
                    "sealed segment ends inside a record".into(),
                ));
            }
            Parsed::Bad(reason) => return Err(corrupt(offset, reason)),
        }
    }
    let torn = total - offset;
    if torn > 0 {
        tracing::warn!(
            path = %path.display(),
            offset,
            torn_bytes = torn,
            "log: cutting off a torn tail (an append that never completed)"
        );
        file.set_len(offset).map_err(io_err(&path))?;
        file.sync_all().map_err(io_err(&path))?;
    }
    Ok((
        Segment {
            first_index,
            path,
            offsets,
            len: offset,
            file: Arc::new(file),
            map: None,
        },
        torn,
    ))
}

/// A complete record with a bad crc is a torn write only if it is the last
/// thing in the file; with more bytes after it, it is corruption in the
/// middle. A length over the limit is never torn (an append writes its
/// length first): it is corruption wherever it is. All zeros to the end is
/// a tail.
fn bad_record_is_tail(bytes: &[u8], offset: u64, record_bytes_max: u32) -> bool {
    let rest = &bytes[offset as usize..];
    // A file extended but never written (a crash after the size was
    // updated) reads as zeros, which never form a valid record.
    if rest.iter().all(|&b| b == 0) {
        return true;
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    len <= record_bytes_max && RECORD_HEADER_BYTES as usize + len as usize >= rest.len()
}

/// The synced mark, if one reads back whole (see `SYNCED_MARK_FILE`).
fn read_synced_mark(dir: &Path) -> Option<(u64, u64)> {
    let bytes = std::fs::read(dir.join(SYNCED_MARK_FILE)).ok()?;
    match parse_record(&bytes, 16) {
        Parsed::Record { payload, .. } if payload.len() == 16 => {
            let mut first = [0u8; 8];
            let mut len = [0u8; 8];
            first.copy_from_slice(&payload[..8]);
            len.copy_from_slice(&payload[8..]);
            Some((u64::from_le_bytes(first), u64::from_le_bytes(len)))
        }
        _ => None,
    }
}

fn read_first_index(dir: &Path) -> LogResult<Option<u64>> {
    let path = dir.join(FIRST_INDEX_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    match parse_record(&bytes, 8) {
        Parsed::Record { payload, .. } if payload.len() == 8 => {
            let mut index = [0u8; 8];
            index.copy_from_slice(payload);
            Ok(Some(u64::from_le_bytes(index)))
        }
        _ => Err(LogError::Corrupt {
            path,
            offset: 0,
            reason: "first-index record does not check".into(),
        }),
    }
}

/// Replaces the purge point atomically and durably.
fn write_first_index(dir: &Path, index: u64) -> LogResult<()> {
    let path = dir.join(FIRST_INDEX_FILE);
    let mut record = Vec::with_capacity(16);
    encode_record(&index.to_le_bytes(), &mut record);
    crate::durable::write_atomic(&path, &record).map_err(io_err(&path))
}

/// Called once the appended entries are durable (or the fsync failed).
pub type FlushCallback = Box<dyn FnOnce(io::Result<()>) + Send>;

struct Shared {
    log: Mutex<SegmentedLog>,
    pending: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    callbacks: Vec<FlushCallback>,
    closed: bool,
}

/// A [`SegmentedLog`] shared between readers and one appender, with group
/// commit: [`GroupCommitLog::append`] writes and returns; a background thread
/// runs one fsync for every append that arrived while the previous fsync ran,
/// then calls their callbacks in order.
///
/// The flusher sleeps on a condition variable with no timeout: an idle log
/// costs no wakeups (a node hosts hundreds of groups). It stops when
/// [`Self::close`] is called or the last handle is dropped.
#[derive(Clone)]
pub struct GroupCommitLog {
    shared: Arc<Shared>,
    _close_on_drop: Arc<CloseOnDrop>,
}

/// Held by every handle; dropped with the last one, it stops the flusher
/// (which holds `Shared` itself, so it cannot notice the drop on its own).
struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        close(&self.0);
    }
}

fn close(shared: &Shared) {
    shared.pending.lock().closed = true;
    shared.wake.notify_one();
}

impl std::fmt::Debug for GroupCommitLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommitLog").finish_non_exhaustive()
    }
}

impl GroupCommitLog {
    /// Wraps an open log and starts its flusher thread (it exits when the
    /// last handle is dropped or [`Self::close`] is called).
    pub fn new(log: SegmentedLog) -> LogResult<Self> {
        let shared = Arc::new(Shared {
            log: Mutex::new(log),
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
        });
        let flusher_shared = shared.clone();
        std::thread::Builder::new()
            .name("quiver-log-flush".into())
            .spawn(move || flusher(&flusher_shared))
            .map_err(|e| LogError::Io {
                path: PathBuf::from("log flusher thread"),
                source: e,
            })?;
        Ok(Self {
            _close_on_drop: Arc::new(CloseOnDrop(shared.clone())),
            shared,
        })
    }

    /// Runs `f` with the log locked (reads, truncation, purge).
    pub fn with<R>(&self, f: impl FnOnce(&mut SegmentedLog) -> R) -> R {
        f(&mut self.shared.log.lock())
    }

    /// Appends and schedules `done` for when the entries are durable.
    pub fn append<'a>(
        &self,
        first_index: u64,
        payloads: impl IntoIterator<Item = &'a [u8]>,
        done: FlushCallback,
    ) -> LogResult<()> {
        // Append and enqueue under the log lock, so a flush that observes the
        // callback also covers its bytes.
        let mut log = self.shared.log.lock();
        log.append(first_index, payloads)?;
        let mut pending = self.shared.pending.lock();
        pending.callbacks.push(done);
        drop(log);
        drop(pending);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Stops the flusher after it has flushed what is pending.
    pub fn close(&self) {
        close(&self.shared);
    }
}

fn flusher(strong: &Shared) {
    loop {
        let (callbacks, target) = {
            let mut pending = strong.pending.lock();
            while pending.callbacks.is_empty() && !pending.closed {
                strong.wake.wait(&mut pending);
            }
            if pending.callbacks.is_empty() && pending.closed {
                return;
            }
            let callbacks = std::mem::take(&mut pending.callbacks);
            drop(pending);
            // Everything enqueued so far was written to the active segment
            // (or to a sealed one, already synced) before being enqueued.
            let log = strong.log.lock();
            let target = if log.options.sync {
                log.sync_target()
            } else {
                None
            };
            (callbacks, target)
        };
        let result = match &target {
            Some(target) => target.file.sync_data(),
            None => Ok(()),
        };
        match (&result, &target) {
            (Err(e), Some(target)) => {
                tracing::error!(path = %target.path.display(), error = %e, "log fsync failed");
            }
            (Ok(()), Some(target)) => strong.log.lock().mark_synced(target),
            _ => {}
        }
        for callback in callbacks {
            let outcome = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            callback(outcome);
        }
    }
}

#[cfg(test)]
mod tests;
