//! A full backup's manifest: what the backup holds (every shard's record
//! with its range in the cluster map, then the metadata group's), written
//! once, after everything it names is uploaded.

use serde::{Deserialize, Serialize};

use super::BackupError;
use quiver_raft::backup::ShardBackup;

/// The manifest format this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// Largest manifest read back.
pub const MANIFEST_BYTES_MAX: u64 = 64 << 20;
/// Longest backup id.
pub const BACKUP_ID_BYTES_MAX: usize = 64;
/// Most shards one manifest may list.
pub const MANIFEST_SHARDS_MAX: usize = 65_536;

/// One shard of a backup: its hash range in the cluster map, where its
/// files are and its record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// First hash of the shard's range (as the map had it).
    pub start: u64,
    /// First hash past it (`None`: the end of the ring).
    pub end: Option<u64>,
    /// The directory under the backup's `shards/` holding its files: one
    /// per upload attempt, so an attempt that outlived its deadline can
    /// never overwrite the files of the one that counts.
    pub dir: String,
    /// What was backed up.
    pub record: ShardBackup,
}

/// The metadata group's part of a backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetadataEntry {
    /// See [`ShardEntry::dir`].
    pub dir: String,
    /// What was backed up.
    #[serde(flatten)]
    pub record: ShardBackup,
}

/// A complete backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupManifest {
    /// Format version ([`MANIFEST_VERSION`]).
    pub version: u32,
    /// The backup's id: its start time (UTC) and a random suffix, so ids
    /// sort by time.
    pub backup_id: String,
    /// When the coordinator started it (µs since the epoch, its clock).
    pub started_at_us: i64,
    /// When every file was uploaded.
    pub finished_at_us: i64,
    /// The cluster map version the shards were taken from.
    pub map_version: u64,
    /// The backed-up cluster's id: its shipped log is under
    /// `log/<cluster id>/` (`None`: not known to the build that took it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// The data shards.
    pub shards: Vec<ShardEntry>,
    /// The metadata group (views, cluster map), cut after every shard, at
    /// a metadata read index taken after them.
    pub metadata: MetadataEntry,
}

impl BackupManifest {
    /// Every part with its directory: the shards', then the metadata
    /// group's.
    pub fn parts(&self) -> impl Iterator<Item = (&str, &ShardBackup)> {
        self.shards
            .iter()
            .map(|s| (s.dir.as_str(), &s.record))
            .chain(std::iter::once((
                self.metadata.dir.as_str(),
                &self.metadata.record,
            )))
    }

    /// Bytes of every file.
    pub fn bytes(&self) -> u64 {
        self.parts().map(|(_, record)| record.bytes()).sum()
    }

    /// Rows in the data shards.
    pub fn rows(&self) -> u64 {
        self.shards.iter().map(|s| s.record.rows).sum()
    }

    /// Encodes it (JSON, for people and scripts too).
    pub fn encode(&self) -> Result<Vec<u8>, BackupError> {
        serde_json::to_vec_pretty(self).map_err(|e| BackupError::Corrupt {
            what: "manifest".into(),
            reason: e.to_string(),
        })
    }

    /// Decodes a manifest read back (bytes that may be anything): size,
    /// version, id and every record are checked.
    pub fn decode(bytes: &[u8]) -> Result<BackupManifest, BackupError> {
        let corrupt = |reason: String| BackupError::Corrupt {
            what: "backup manifest".into(),
            reason,
        };
        if bytes.len() as u64 > MANIFEST_BYTES_MAX {
            return Err(corrupt(format!(
                "{} bytes, more than {MANIFEST_BYTES_MAX}",
                bytes.len()
            )));
        }
        let manifest: BackupManifest =
            serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        if manifest.version != MANIFEST_VERSION {
            return Err(corrupt(format!(
                "version {} is not {MANIFEST_VERSION}",
                manifest.version
            )));
        }
        check_backup_id(&manifest.backup_id)?;
        if let Some(cluster_id) = &manifest.cluster_id {
            super::log::check_cluster_id(cluster_id)?;
        }
        if manifest.shards.len() > MANIFEST_SHARDS_MAX {
            return Err(corrupt(format!(
                "{} shards, more than {MANIFEST_SHARDS_MAX}",
                manifest.shards.len()
            )));
        }
        for (dir, record) in manifest.parts() {
            check_part_dir(dir)?;
            record
                .check()
                .map_err(|e| corrupt(format!("shard {}: {e}", record.group)))?;
        }
        check_ring(&manifest.shards).map_err(corrupt)?;
        Ok(manifest)
    }
}

/// The shards' ranges, in order, cover the whole ring once, and each
/// record's own range (a shard that split) is the one the map gave it: a
/// backup that missed rows is never taken for whole.
pub fn check_ring(shards: &[ShardEntry]) -> Result<(), String> {
    let mut ranges: Vec<(u64, Option<u64>)> = shards.iter().map(|s| (s.start, s.end)).collect();
    ranges.sort_unstable();
    let mut next = Some(0u64);
    for &(start, end) in &ranges {
        if Some(start) != next || end.is_some_and(|end| end <= start) {
            return Err(format!(
                "the shards' ranges do not cover the ring once (at {start:#x})"
            ));
        }
        next = end;
    }
    if !ranges.is_empty() && next.is_some() {
        return Err("the shards' ranges stop before the end of the ring".into());
    }
    for shard in shards {
        if let Some(range) = &shard.record.range
            && (range.start, range.end) != (shard.start, shard.end)
        {
            return Err(format!(
                "shard {} holds {:#x}..{:?}, the map gave it {:#x}..{:?}: it split during the \
                 backup",
                shard.record.group, range.start, range.end, shard.start, shard.end
            ));
        }
    }
    Ok(())
}

/// A directory name for one upload attempt of `group` by `node`.
pub fn new_part_dir(group: quiver_raft::GroupId, node: u64) -> String {
    format!("{group}-n{node}-{:08x}", rand::random::<u32>())
}

/// Whether `dir` may name a part's directory (it becomes part of object
/// keys): the same alphabet as backup ids.
pub fn check_part_dir(dir: &str) -> Result<(), BackupError> {
    check_backup_id(dir).map_err(|_| BackupError::Corrupt {
        what: "backup manifest".into(),
        reason: format!(
            "{:?} is not a part directory",
            dir.chars().take(80).collect::<String>()
        ),
    })
}

/// A new backup id for a backup started at `now_us`:
/// `YYYYMMDDTHHMMSSmmmZ-<8 hex digits>` (UTC, to the millisecond).
pub fn new_backup_id(now_us: i64) -> String {
    let at = std::time::UNIX_EPOCH
        + std::time::Duration::from_micros(u64::try_from(now_us).unwrap_or(0));
    let stamp: String = humantime::format_rfc3339_millis(at)
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':' | '.'))
        .collect();
    format!("{stamp}-{:08x}", rand::random::<u32>())
}

/// When backup `id` was started (µs since the epoch), read back from the
/// id ([`new_backup_id`]); `None` for an id this build did not make.
pub fn backup_id_time_us(id: &str) -> Option<i64> {
    let stamp = id.get(..19)?;
    let b = stamp.as_bytes();
    if b[8] != b'T' || b[18] != b'Z' {
        return None;
    }
    let text = format!(
        "{}-{}-{}T{}:{}:{}.{}Z",
        &stamp[0..4],
        &stamp[4..6],
        &stamp[6..8],
        &stamp[9..11],
        &stamp[11..13],
        &stamp[13..15],
        &stamp[15..18]
    );
    let at = humantime::parse_rfc3339(&text).ok()?;
    i64::try_from(at.duration_since(std::time::UNIX_EPOCH).ok()?.as_micros()).ok()
}

/// Whether `id` may name a backup (it becomes part of object keys): 1 to
/// [`BACKUP_ID_BYTES_MAX`] ASCII letters, digits and `-`.
pub fn check_backup_id(id: &str) -> Result<(), BackupError> {
    let fine = !id.is_empty()
        && id.len() <= BACKUP_ID_BYTES_MAX
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if fine {
        Ok(())
    } else {
        Err(BackupError::Invalid(format!(
            "{:?} is not a backup id (1 to {BACKUP_ID_BYTES_MAX} ASCII letters, digits and '-')",
            id.chars().take(80).collect::<String>()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_sort_by_time_and_bad_ids_are_refused() {
        assert_eq!(
            backup_id_time_us(&new_backup_id(1_764_900_000_123_456)),
            Some(1_764_900_000_123_000)
        );
        assert_eq!(backup_id_time_us("short"), None);
        assert_eq!(backup_id_time_us("2025120XT0200000001Z-0"), None);
        let early = new_backup_id(1_764_900_000_000_000);
        let late = new_backup_id(1_764_900_001_000_000);
        assert!(early < late, "{early} {late}");
        assert!(early.starts_with("20251205T020000000Z-"), "{early}");
        let same_second = new_backup_id(1_764_900_000_002_000);
        assert!(early < same_second, "{early} {same_second}");
        check_backup_id(&early).unwrap();
        for bad in ["", "../x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_backup_id(bad).is_err(), "{bad:?}");
        }
    }

    fn entry(start: u64, end: Option<u64>, range: Option<(u64, Option<u64>)>) -> ShardEntry {
        ShardEntry {
            start,
            end,
            dir: "1-n1-00000000".into(),
            record: ShardBackup {
                version: quiver_raft::backup::SHARD_BACKUP_VERSION,
                group: 1,
                applied: None,
                leader_ts_us: 0,
                range: range.map(|(start, end)| quiver_raft::state_machine::RangeDesc {
                    start,
                    end,
                    version: 1,
                    children: Vec::new(),
                }),
                rows: 0,
                digest: format!("{:032x}", 0),
                files: Vec::new(),
            },
        }
    }

    #[test]
    fn a_backup_covers_the_ring_once_with_the_ranges_its_map_gave() {
        let whole = [
            entry(10, None, None),
            entry(0, Some(10), Some((0, Some(10)))),
        ];
        check_ring(&whole).unwrap();
        check_ring(&[]).unwrap();
        for broken in [
            vec![entry(0, Some(10), None)],
            vec![entry(0, Some(10), None), entry(11, None, None)],
            vec![entry(0, Some(10), None), entry(5, None, None)],
            vec![entry(1, None, None)],
            // Split during the backup: its checkpoint holds half the range.
            vec![entry(0, None, Some((0, Some(8))))],
        ] {
            assert!(check_ring(&broken).is_err(), "{:?}", broken.len());
        }
    }

    proptest! {
        // Manifests come back from a backup target: any bytes decode or
        // fail with a reason, never panic.
        #[test]
        fn arbitrary_bytes_never_panic_the_manifest_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..512)
        ) {
            let _ = BackupManifest::decode(&bytes);
        }
    }
}
