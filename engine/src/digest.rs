//! Logical digests of a store's rows: what a backup records and what its
//! verification and a restore compare against, independent of how RocksDB
//! laid the rows out in files (compactions, a restore into a new store).
//!
//! The digest of a set of rows is their count and the sum, modulo 2^128, of
//! a 128-bit hash of each (key, stored value). A sum does not depend on the
//! order rows are visited in, so two stores holding the same rows agree
//! whatever their files, and unlike an XOR a row counted twice does not
//! cancel out. The scan asks RocksDB to verify every block's checksum, so
//! corruption in a table file is an error here, not a different digest.

use std::path::{Path, PathBuf};

use rocksdb::{DB, IteratorMode, Options, ReadOptions};
use xxhash_rust::xxh3::Xxh3;

use crate::error::Result;

/// The column family rows live in (see [`crate::store`]).
const CF_DATA: &str = "data";
/// The column family of metadata.
const CF_META: &str = "meta";

/// The count and order-independent hash of a set of rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct LogicalDigest {
    /// Rows counted.
    pub rows: u64,
    /// The sum of the rows' hashes (wrapping).
    pub sum: u128,
}

impl LogicalDigest {
    /// Counts one row.
    pub fn add(&mut self, key: &[u8], value: &[u8]) {
        let mut hasher = Xxh3::new();
        // The key's length first: (ab, c) and (a, bc) differ.
        hasher.update(&(key.len() as u64).to_le_bytes());
        hasher.update(key);
        hasher.update(value);
        self.rows += 1;
        self.sum = self.sum.wrapping_add(hasher.digest128());
    }

    /// The sum as 32 hex digits.
    pub fn sum_hex(&self) -> String {
        format!("{:032x}", self.sum)
    }

    /// The sum from [`Self::sum_hex`]'s form.
    pub fn parse_sum(hex: &str) -> Option<u128> {
        (hex.len() == 32)
            .then(|| u128::from_str_radix(hex, 16).ok())
            .flatten()
    }
}

/// The storage keys bounding a hash range: `[from, to)`. Every key is
/// `hash (8 bytes) | view id (4) | entity key`, and an entity key is UTF-8,
/// which never holds a 0xFF byte: thirteen 0xFF bytes lie past every key.
pub(crate) fn hash_range_keys(from_hash: u64, to_hash: Option<u64>) -> (Vec<u8>, Vec<u8>) {
    let from = from_hash.to_be_bytes().to_vec();
    let to = match to_hash {
        Some(to) => to.to_be_bytes().to_vec(),
        None => vec![0xFF; 13],
    };
    (from, to)
}

/// The digest of the rows of `db`'s data family in a hash range.
pub(crate) fn digest_db(db: &DB, from_hash: u64, to_hash: Option<u64>) -> Result<LogicalDigest> {
    let mut digest = LogicalDigest::default();
    let (from, to) = hash_range_keys(from_hash, to_hash);
    if from >= to {
        return Ok(digest);
    }
    let Some(cf) = db.cf_handle(CF_DATA) else {
        return Ok(digest);
    };
    let mut read = ReadOptions::default();
    read.set_verify_checksums(true);
    // A backup's scan is read once: it must not evict the serving set.
    read.fill_cache(false);
    read.set_iterate_upper_bound(to);
    let iter = db.iterator_cf_opt(
        cf,
        read,
        IteratorMode::From(&from, rocksdb::Direction::Forward),
    );
    for item in iter {
        let (key, value) = item?;
        digest.add(&key, &value);
    }
    Ok(digest)
}

/// A store's checkpoint opened read-only (a snapshot or a backup being
/// verified): its rows' digest and its metadata, without changing its files.
pub struct CheckpointReader {
    db: DB,
}

impl CheckpointReader {
    /// Opens the checkpoint in `path`. RocksDB's info log goes to the
    /// system's temporary directory, so the checkpoint's own files are the
    /// only ones in `path`.
    pub fn open(path: &Path) -> Result<CheckpointReader> {
        let mut options = Options::default();
        options.set_db_log_dir(log_dir());
        options.set_keep_log_file_num(1);
        let families = DB::list_cf(&options, path)?;
        let db = DB::open_cf_for_read_only(&options, path, families, false)?;
        Ok(CheckpointReader { db })
    }

    /// The digest of its rows in `[from_hash, to_hash)`.
    pub fn digest(&self, from_hash: u64, to_hash: Option<u64>) -> Result<LogicalDigest> {
        digest_db(&self.db, from_hash, to_hash)
    }

    /// One key of its metadata family.
    pub fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.db.cf_handle(CF_META) {
            Some(cf) => Ok(self.db.get_cf(cf, key)?),
            None => Ok(None),
        }
    }
}

fn log_dir() -> PathBuf {
    std::env::temp_dir().join("quiver-readonly-logs")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RowWrite, StateStore, StoreOptions, Value};
    use proptest::prelude::*;

    fn options() -> StoreOptions {
        StoreOptions::scratch()
    }

    fn row(key: &str, value: i64) -> RowWrite {
        RowWrite {
            entity_key: key.to_owned(),
            event_ts_us: 100,
            values: vec![(1, Value::Int64(value))],
        }
    }

    fn store_with(dir: &Path, rows: &[RowWrite]) -> StateStore {
        let store = StateStore::open(dir, options()).unwrap();
        for chunk in rows.chunks(7) {
            store.write_rows_at(3, chunk, 1_000, &[]).unwrap();
        }
        store
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn the_digest_is_the_rows_whatever_their_order_and_files(
            values in proptest::collection::btree_map("[a-z]{1,8}", any::<i64>(), 1..60),
            seed in any::<u64>(),
        ) {
            let rows: Vec<RowWrite> = values.iter().map(|(k, v)| row(k, *v)).collect();
            let mut shuffled = rows.clone();
            // A deterministic shuffle by the seed.
            shuffled.sort_by_key(|r| xxhash_rust::xxh3::xxh3_64_with_seed(r.entity_key.as_bytes(), seed));
            let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let first = store_with(a.path(), &rows);
            let second = store_with(b.path(), &shuffled);
            second.flush().unwrap();
            let digest = first.digest(0, None).unwrap();
            prop_assert_eq!(digest.rows, rows.len() as u64);
            prop_assert_eq!(digest, second.digest(0, None).unwrap());
            // One value changed: another digest.
            let (key, value) = values.iter().next().unwrap();
            second.write_rows_at(3, &[RowWrite { event_ts_us: 200, ..row(key, value.wrapping_add(1)) }], 1_000, &[]).unwrap();
            prop_assert_ne!(digest, second.digest(0, None).unwrap());
        }
    }

    #[test]
    fn ranges_add_up_and_a_checkpoint_reads_the_same_without_changing_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<RowWrite> = (0..500).map(|i| row(&format!("k{i}"), i)).collect();
        let store = store_with(&dir.path().join("live"), &rows);
        let whole = store.digest(0, None).unwrap();
        let low = store.digest(0, Some(1 << 63)).unwrap();
        let high = store.digest(1 << 63, None).unwrap();
        assert_eq!(low.rows + high.rows, 500);
        assert!(low.rows > 0 && high.rows > 0);
        assert_eq!(low.sum.wrapping_add(high.sum), whole.sum);
        assert_eq!(store.digest(7, Some(7)).unwrap(), LogicalDigest::default());

        let checkpoint = dir.path().join("checkpoint");
        store.checkpoint_with_meta(&checkpoint, b"absent").unwrap();
        let before: Vec<_> = files(&checkpoint);
        let reader = CheckpointReader::open(&checkpoint).unwrap();
        assert_eq!(reader.digest(0, None).unwrap(), whole);
        assert_eq!(
            reader.get_meta(b"next_view_id").unwrap(),
            store.get_meta(b"next_view_id").unwrap()
        );
        drop(reader);
        assert_eq!(files(&checkpoint), before, "read-only: no file changed");
    }

    #[test]
    fn a_corrupt_table_file_is_an_error_not_another_digest() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<RowWrite> = (0..2000).map(|i| row(&format!("key-{i}"), i)).collect();
        let store = store_with(&dir.path().join("live"), &rows);
        let checkpoint = dir.path().join("checkpoint");
        store.checkpoint_with_meta(&checkpoint, b"x").unwrap();
        let table = std::fs::read_dir(&checkpoint)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "sst"))
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .unwrap();
        // Checkpoint table files are hard links to the live store's: copy
        // before corrupting, so the live store keeps its bytes.
        let mut bytes = std::fs::read(&table).unwrap();
        std::fs::remove_file(&table).unwrap();
        bytes[100] ^= 0x55;
        std::fs::write(&table, &bytes).unwrap();
        let reader = CheckpointReader::open(&checkpoint).unwrap();
        assert!(reader.digest(0, None).is_err());
    }

    fn files(dir: &Path) -> Vec<(String, u64)> {
        let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        files.sort();
        files
    }
}
