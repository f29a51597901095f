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

/// One shard of a backup: its hash range in the cluster map and its record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// First hash of the shard's range (as the map had it).
    pub start: u64,
    /// First hash past it (`None`: the end of the ring).
    pub end: Option<u64>,
    /// What was backed up.
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
    /// The data shards.
    pub shards: Vec<ShardEntry>,
    /// The metadata group (views, cluster map), cut after every shard.
    pub metadata: ShardBackup,
}

impl BackupManifest {
    /// Every record: the shards', then the metadata group's.
    pub fn records(&self) -> impl Iterator<Item = &ShardBackup> {
        self.shards
            .iter()
            .map(|s| &s.record)
            .chain(std::iter::once(&self.metadata))
    }

    /// Bytes of every file.
    pub fn bytes(&self) -> u64 {
        self.records().map(ShardBackup::bytes).sum()
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
        if manifest.shards.len() > MANIFEST_SHARDS_MAX {
            return Err(corrupt(format!(
                "{} shards, more than {MANIFEST_SHARDS_MAX}",
                manifest.shards.len()
            )));
        }
        for record in manifest.records() {
            record
                .check()
                .map_err(|e| corrupt(format!("shard {}: {e}", record.group)))?;
        }
        Ok(manifest)
    }
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
