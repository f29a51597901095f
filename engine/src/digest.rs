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
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::codec::{decode_stored, encode_value};
use crate::error::{EngineError, Result};
use crate::keys::split_storage_key;
use crate::registry::Catalog;
use crate::row::FieldId;
use crate::value::Value;
use crate::view::FeatureView;

/// The column family rows live in (see [`crate::store`]).
const CF_DATA: &str = "data";
/// The column family of metadata.
const CF_META: &str = "meta";

/// The count and order-independent hash of a set of rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

    /// Counts one row by what a reader sees of it: its view's name, entity
    /// key, event time and each feature of the view by name with its
    /// value. Ids, write times and layout are left out, so a backup and
    /// the cluster it was restored into (which gives views and fields new
    /// ids and writes every row anew) agree. Fields the view no longer has
    /// are not seen by readers and are left out too.
    pub fn add_content(
        &mut self,
        view: &FeatureView,
        entity: &[u8],
        event_ts_us: i64,
        values: &[(FieldId, Value)],
    ) {
        let mut key = Vec::with_capacity(8 + view.name.len() + entity.len());
        key.extend_from_slice(&(view.name.len() as u64).to_le_bytes());
        key.extend_from_slice(view.name.as_bytes());
        key.extend_from_slice(entity);
        let mut named: Vec<(&str, &Value)> = values
            .iter()
            .filter_map(|(field, value)| {
                view.features
                    .iter()
                    .find(|f| f.field_id == *field)
                    .map(|f| (f.name.as_str(), value))
            })
            .collect();
        named.sort_unstable_by_key(|(name, _)| *name);
        let mut content = Vec::with_capacity(16 + 24 * named.len());
        content.extend_from_slice(&event_ts_us.to_le_bytes());
        for (name, value) in named {
            content.extend_from_slice(&(name.len() as u64).to_le_bytes());
            content.extend_from_slice(name.as_bytes());
            encode_value(value, &mut content);
        }
        self.add(&key, &content);
    }

    /// Adds another digest's rows (of rows disjoint from these).
    pub fn merge(&mut self, other: LogicalDigest) {
        self.rows += other.rows;
        self.sum = self.sum.wrapping_add(other.sum);
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
    for item in scan_range(db, from_hash, to_hash, None)
        .into_iter()
        .flatten()
    {
        let (key, value) = item?;
        digest.add(&key, &value);
    }
    Ok(digest)
}

/// The rows of `db`'s data family in a hash range, every block's checksum
/// verified, without filling the block cache (a scan reads each block once:
/// it must not evict the serving set); `None` for an empty range or a store
/// without the family.
fn scan_range<'a>(
    db: &'a DB,
    from_hash: u64,
    to_hash: Option<u64>,
    snapshot: Option<&rocksdb::Snapshot<'a>>,
) -> Option<rocksdb::DBIterator<'a>> {
    let (from, to) = hash_range_keys(from_hash, to_hash);
    if from >= to {
        return None;
    }
    let cf = db.cf_handle(CF_DATA)?;
    let mut read = ReadOptions::default();
    read.set_verify_checksums(true);
    read.fill_cache(false);
    read.set_iterate_upper_bound(to);
    if let Some(snapshot) = snapshot {
        read.set_snapshot(snapshot);
    }
    Some(db.iterator_cf_opt(
        cf,
        read,
        IteratorMode::From(&from, rocksdb::Direction::Forward),
    ))
}

/// What a reader sees of a store's rows in a hash range, by content
/// ([`LogicalDigest::add_content`]), and what it does not see.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentDigest {
    /// The live rows of known views.
    pub live: LogicalDigest,
    /// Deleted rows (tombstones).
    pub tombstones: u64,
    /// Rows below their view's expiry floor (they read as absent).
    pub expired: u64,
    /// Rows of views deleted from the catalog.
    pub dropped_view_rows: u64,
    /// Rows of view ids the catalog has never known (a catalog older than
    /// the rows: the digest is not to be trusted).
    pub unknown_view_rows: u64,
}

impl ContentDigest {
    /// Adds another range's counts (digests of disjoint ranges add up).
    pub fn merge(&mut self, other: ContentDigest) {
        self.live.merge(other.live);
        self.tombstones += other.tombstones;
        self.expired += other.expired;
        self.dropped_view_rows += other.dropped_view_rows;
        self.unknown_view_rows += other.unknown_view_rows;
    }

    /// Every row counted, seen or not.
    pub fn rows_stored(&self) -> u64 {
        self.live.rows
            + self.tombstones
            + self.expired
            + self.dropped_view_rows
            + self.unknown_view_rows
    }
}

/// The content digest of `db`'s rows in `[from_hash, to_hash)` (as of
/// `snapshot` when given), named by `catalog`; `expired` says whether a
/// row (key, event time) is below its view's floor.
pub(crate) fn content_digest_db<'a>(
    db: &'a DB,
    snapshot: Option<&rocksdb::Snapshot<'a>>,
    from_hash: u64,
    to_hash: Option<u64>,
    catalog: &Catalog,
    expired: &dyn Fn(&[u8], i64) -> bool,
) -> Result<ContentDigest> {
    let mut digest = ContentDigest::default();
    for item in scan_range(db, from_hash, to_hash, snapshot)
        .into_iter()
        .flatten()
    {
        let (key, value) = item?;
        let corrupt = |reason: String| EngineError::Corrupt {
            what: format!("stored row {key:02x?}"),
            reason,
        };
        let Some(row) = decode_stored(&value).map_err(|e| corrupt(e.to_string()))? else {
            digest.tombstones += 1;
            continue;
        };
        let Some((_, view_id, entity)) = split_storage_key(&key) else {
            return Err(corrupt(format!("a key of {} bytes", key.len())));
        };
        if expired(&key, row.event_ts_us) {
            digest.expired += 1;
        } else if let Some(view) = catalog.view_by_id(view_id) {
            digest
                .live
                .add_content(view, entity, row.event_ts_us, &row.values);
        } else if catalog.is_dropped(view_id) {
            digest.dropped_view_rows += 1;
        } else {
            digest.unknown_view_rows += 1;
        }
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

    fn view_spec(name: &str, features: &[&str]) -> crate::ViewSpec {
        crate::ViewSpec {
            name: name.to_owned(),
            entities: vec!["id".to_owned()],
            features: features
                .iter()
                .map(|f| crate::FeatureSpec {
                    name: (*f).to_owned(),
                    value_type: crate::ValueType::Int64,
                    default: None,
                })
                .collect(),
            ttl_seconds: 0,
            description: String::new(),
        }
    }

    #[test]
    fn the_content_digest_sees_names_and_values_not_ids_or_write_times() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = StateStore::open(a.path(), options()).unwrap();
        let second = StateStore::open(b.path(), options()).unwrap();
        // The second store has another view first: its "v" gets another
        // id, and its features other field ids (declared in another order).
        second.apply_view(view_spec("other", &["x"])).unwrap();
        let (v1, _) = first.apply_view(view_spec("v", &["a", "b"])).unwrap();
        let (v2, _) = second.apply_view(view_spec("v", &["b", "a"])).unwrap();
        assert_ne!(v1.id, v2.id);
        let field = |v: &FeatureView, name: &str| v.feature(name).unwrap().field_id;
        let write = |store: &StateStore, v: &FeatureView, key: &str, a: i64, written: i64| {
            let mut values = vec![
                (field(v, "a"), Value::Int64(a)),
                (field(v, "b"), Value::Int64(7)),
            ];
            values.sort_by_key(|(f, _)| *f);
            store
                .write_rows_at(
                    v.id,
                    &[RowWrite {
                        entity_key: key.to_owned(),
                        event_ts_us: 100,
                        values,
                    }],
                    written,
                    &[],
                )
                .unwrap();
        };
        for i in 0..20 {
            write(&first, &v1, &format!("k{i}"), i, 1_000);
            write(&second, &v2, &format!("k{i}"), i, 9_000);
        }
        let one = first.content_digest(0, None).unwrap();
        let two = second.content_digest(0, None).unwrap();
        assert_eq!(one.live.rows, 20);
        assert_eq!(one, two);
        // The stored digest, which sees ids and write times, differs.
        assert_ne!(
            first.digest(0, None).unwrap(),
            second.digest(0, None).unwrap()
        );

        // One value changed: another content digest.
        write(&second, &v2, "k3", 4, 9_000);
        assert_ne!(second.content_digest(0, None).unwrap(), one);
        write(&second, &v2, "k3", 3, 9_000);
        assert_eq!(second.content_digest(0, None).unwrap(), one);

        // A deleted row is a tombstone; a deleted view's rows are counted
        // apart; neither is live.
        second.delete_rows(v2.id, &["k0".to_owned()]).unwrap();
        let deleted = second.content_digest(0, None).unwrap();
        assert_eq!((deleted.live.rows, deleted.tombstones), (19, 1));
        second.delete_view("v").unwrap();
        let dropped = second.content_digest(0, None).unwrap();
        assert_eq!((dropped.live.rows, dropped.dropped_view_rows), (0, 19));
        assert_eq!(dropped.unknown_view_rows, 0);
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
