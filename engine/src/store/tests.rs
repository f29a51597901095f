use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::clock::ManualClock;
use crate::row::RowFreshness;
use crate::value::ValueType;
use crate::view::FeatureSpec;

const HOUR_US: i64 = 3600 * 1_000_000;
const T0_US: i64 = 1_700_000_000 * 1_000_000;

fn spec(name: &str, ttl_seconds: u64) -> ViewSpec {
    ViewSpec {
        name: name.into(),
        entities: vec!["driver_id".into()],
        features: vec![
            FeatureSpec {
                name: "trips".into(),
                value_type: ValueType::Int64,
                default: None,
            },
            FeatureSpec {
                name: "rating".into(),
                value_type: ValueType::Double,
                default: None,
            },
        ],
        ttl_seconds,
        description: String::new(),
    }
}

fn open(dir: &Path, clock: Arc<ManualClock>) -> StateStore {
    let options = StoreOptions {
        sync_writes: false,
        block_cache_bytes: 8 << 20,
        write_buffer_bytes: 4 << 20,
        clock,
        ..StoreOptions::default()
    };
    StateStore::open(dir, options).expect("open store")
}

fn row(key: &str, event_ts_us: i64, trips: i64) -> RowWrite {
    RowWrite {
        entity_key: key.into(),
        event_ts_us,
        values: vec![(1, Value::Int64(trips)), (2, Value::Null)],
    }
}

fn trips(store: &StateStore, view: &FeatureView, key: &str) -> Option<(i64, i64)> {
    let rows = store.get_rows(&[storage_key(view.id, key.as_bytes())]);
    let row = rows
        .into_iter()
        .next()
        .expect("one result")
        .expect("readable")?;
    match row.value(1) {
        Some(Value::Int64(t)) => Some((row.event_ts_us, *t)),
        other => panic!("unexpected value {other:?}"),
    }
}

#[test]
fn last_write_wins_by_event_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Arc::new(ManualClock::new(T0_US)));
    let (view, _) = store.apply_view(spec("v", 0)).unwrap();

    tracing::info!("newer applies, older is ignored and counted");
    let out = store.write_rows(view.id, &[row("a", 200, 2)]).unwrap();
    assert_eq!((out.rows_applied, out.rows_stale), (1, 0));
    let out = store.write_rows(view.id, &[row("a", 100, 1)]).unwrap();
    assert_eq!((out.rows_applied, out.rows_stale), (0, 1));
    assert!(out.changed_keys.is_empty());
    assert_eq!(trips(&store, &view, "a"), Some((200, 2)));

    tracing::info!("equal event time: the later write wins");
    store.write_rows(view.id, &[row("a", 200, 3)]).unwrap();
    assert_eq!(trips(&store, &view, "a"), Some((200, 3)));

    tracing::info!("out of order inside one batch");
    let out = store
        .write_rows(
            view.id,
            &[
                row("b", 50, 5),
                row("b", 10, 1),
                row("b", 50, 6),
                row("b", 49, 7),
            ],
        )
        .unwrap();
    assert_eq!((out.rows_applied, out.rows_stale), (2, 2));
    assert_eq!(trips(&store, &view, "b"), Some((50, 6)));
    assert_eq!(store.stats().rows_stale, 3);
}

#[test]
fn concurrent_writers_never_regress() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path(), Arc::new(ManualClock::new(T0_US))));
    let (view, _) = store.apply_view(spec("v", 0)).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let store = store.clone();
            let view_id = view.id;
            std::thread::spawn(move || {
                for i in 0..200 {
                    // Interleaved timestamps: thread t writes t, t+4, ...
                    let ts = i * 4 + t;
                    store.write_rows(view_id, &[row("k", ts, ts)]).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(trips(&store, &view, "k"), Some((799, 799)));
}

#[test]
fn ttl_is_judged_at_read_with_the_clock() {
    let row = StoredRow {
        event_ts_us: T0_US,
        written_ts_us: T0_US,
        values: vec![],
    };
    assert_eq!(row.freshness(HOUR_US, T0_US + HOUR_US), RowFreshness::Fresh);
    assert_eq!(
        row.freshness(HOUR_US, T0_US + HOUR_US + 1),
        RowFreshness::Expired
    );
}

#[test]
fn compaction_drops_only_rows_below_the_expiry_floor() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0_US));
    let store = open(dir.path(), clock.clone());
    let (short, _) = store.apply_view(spec("short", 3600)).unwrap();
    let (forever, _) = store.apply_view(spec("forever", 0)).unwrap();
    let (doomed, _) = store.apply_view(spec("doomed", 0)).unwrap();

    store
        .write_rows(
            short.id,
            &[row("old", T0_US - HOUR_US, 1), row("new", T0_US, 2)],
        )
        .unwrap();
    store
        .write_rows(forever.id, &[row("old", T0_US - 100 * HOUR_US, 3)])
        .unwrap();
    store.write_rows(doomed.id, &[row("x", T0_US, 4)]).unwrap();

    tracing::info!("no floor: the clock alone expires nothing");
    clock.set_us(T0_US + 1000 * HOUR_US);
    store.compact_data().unwrap();
    assert!(trips(&store, &short, "old").is_some());

    tracing::info!("a floor between the rows: old dropped, new kept, deleted view dropped");
    let moved = store
        .advance_expiry(&[(short.id, T0_US - HOUR_US + 1)], &[])
        .unwrap();
    assert_eq!(moved, vec![short.id]);
    assert_eq!(
        trips(&store, &short, "old"),
        None,
        "masked before compaction"
    );
    store.delete_view("doomed").unwrap();
    store.compact_data().unwrap();
    assert_eq!(trips(&store, &short, "old"), None);
    assert_eq!(trips(&store, &short, "new"), Some((T0_US, 2)));
    assert_eq!(
        trips(&store, &forever, "old"),
        Some((T0_US - 100 * HOUR_US, 3))
    );
    assert_eq!(trips(&store, &doomed, "x"), None);

    tracing::info!("a floor never moves back");
    assert!(
        store
            .advance_expiry(&[(short.id, 0)], &[])
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.expiry_floor(short.id), T0_US - HOUR_US + 1);
}

/// Two replicas that applied the same commands answer the same, whether or
/// not (and whenever) each ran its compactions, and wherever their clocks
/// are: what is expired is the replicated floor, never a replica's clock.
#[test]
fn replicas_agree_on_expired_rows_whatever_their_compactions_and_clocks() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    // One replica's clock is far ahead of the other's.
    let stores = [
        open(dirs[0].path(), Arc::new(ManualClock::new(T0_US))),
        open(
            dirs[1].path(),
            Arc::new(ManualClock::new(T0_US + 1000 * HOUR_US)),
        ),
    ];
    let mut views = Vec::new();
    for store in &stores {
        let (view, _) = store.apply_view(spec("v", 3600)).unwrap();
        store
            .write_rows_at(
                view.id,
                &[row("a", T0_US - 3 * HOUR_US, 1), row("b", T0_US, 2)],
                T0_US,
                &[],
            )
            .unwrap();
        views.push(view);
    }
    // Only the first compacts, before and after the floor moves.
    stores[0].compact_data().unwrap();
    for store in &stores {
        store
            .advance_expiry(&[(views[0].id, T0_US - 2 * HOUR_US)], &[])
            .unwrap();
    }
    stores[0].compact_data().unwrap();
    for key in ["a", "b"] {
        assert_eq!(
            trips(&stores[0], &views[0], key),
            trips(&stores[1], &views[1], key),
            "key {key}"
        );
        let raw: Vec<_> = stores
            .iter()
            .map(|s| {
                s.get_raw(&[storage_key(views[0].id, key.as_bytes())])
                    .pop()
                    .unwrap()
                    .unwrap()
            })
            .collect();
        assert_eq!(raw[0], raw[1], "raw key {key}");
    }
    assert_eq!(trips(&stores[1], &views[1], "a"), None);
    // A late write below the floor is stale on both, although the first
    // replica no longer holds the newer row it would lose against.
    for (store, view) in stores.iter().zip(&views) {
        let outcome = store
            .write_rows_at(view.id, &[row("a", T0_US - 2 * HOUR_US - 1, 9)], T0_US, &[])
            .unwrap();
        assert_eq!(outcome.rows_stale, 1);
        let outcome = store
            .write_rows_at(view.id, &[row("a", T0_US - 2 * HOUR_US, 7)], T0_US, &[])
            .unwrap();
        assert_eq!(outcome.rows_applied, 1);
        assert_eq!(trips(store, view, "a"), Some((T0_US - 2 * HOUR_US, 7)));
    }
}

#[test]
fn expiry_floors_survive_reopen_and_cover_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0_US));
    let view = {
        let store = open(dir.path(), clock.clone());
        let (view, _) = store.apply_view(spec("v", 60)).unwrap();
        store
            .write_rows(view.id, &[row("a", 100, 1), row("b", 300, 2)])
            .unwrap();
        store.delete_rows(view.id, &["b".into()]).unwrap();
        store.advance_expiry(&[(view.id, 200)], &[]).unwrap();
        // Below the floor: nothing to delete, no tombstone.
        assert!(
            store
                .delete_rows(view.id, &["a".into()])
                .unwrap()
                .is_empty()
        );
        view
    };
    let store = open(dir.path(), clock);
    assert_eq!(store.expiry_floor(view.id), 200);
    assert_eq!(trips(&store, &view, "a"), None);
    // The tombstone (event time 300) is above the floor: it still guards.
    assert_eq!(
        store
            .write_rows(view.id, &[row("b", 250, 3)])
            .unwrap()
            .rows_stale,
        1
    );
    store.advance_expiry(&[(view.id, 400)], &[]).unwrap();
    store.compact_data().unwrap();
    // Tombstone gone with the floor past it; a write that old is refused anyway.
    assert_eq!(
        store
            .write_rows(view.id, &[row("b", 350, 3)])
            .unwrap()
            .rows_stale,
        1
    );
    assert_eq!(
        store
            .write_rows(view.id, &[row("b", 400, 4)])
            .unwrap()
            .rows_applied,
        1
    );
    assert_eq!(trips(&store, &view, "b"), Some((400, 4)));
}

#[test]
fn data_and_registry_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0_US));
    let view = {
        let store = open(dir.path(), clock.clone());
        let (view, _) = store.apply_view(spec("v", 60)).unwrap();
        store.apply_view(spec("gone", 0)).unwrap();
        store.delete_view("gone").unwrap();
        store.write_rows(view.id, &[row("a", 5, 55)]).unwrap();
        view
    };
    let store = open(dir.path(), clock);
    let catalog = store.registry().load();
    assert_eq!(**catalog.view("v").unwrap(), *view);
    assert!(catalog.view("gone").is_none());
    assert!(catalog.is_dropped(view.id + 1));
    assert_eq!(trips(&store, &view, "a"), Some((5, 55)));
    // Ids are never reused, even after a reopen.
    let (again, _) = store.apply_view(spec("gone", 0)).unwrap();
    assert_eq!(again.id, view.id + 2);
}

#[test]
fn corrupt_rows_are_reported_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Arc::new(ManualClock::new(T0_US)));
    let (view, _) = store.apply_view(spec("v", 0)).unwrap();
    let key = storage_key(view.id, b"bad");
    store.put_raw_for_test(&key, &[1, 2, 3]).unwrap();
    let result = store.get_rows(&[&key]).pop().unwrap();
    assert!(
        matches!(result, Err(EngineError::Corrupt { .. })),
        "{result:?}"
    );
    assert_eq!(store.stats().rows_corrupt, 1);
    // A write repairs it.
    store.write_rows(view.id, &[row("bad", 1, 1)]).unwrap();
    assert_eq!(trips(&store, &view, "bad"), Some((1, 1)));
}

/// A shard's size is measured over its own hash range: after a split
/// deletes one half (whose files stay until compaction), the other half
/// still measures about half of what the whole did, and an empty store
/// measures little (its fixed overhead must stay far below the smallest
/// size limit a split may be given).
#[test]
fn approximate_bytes_measure_a_hash_range() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Arc::new(ManualClock::new(T0_US)));
    let empty = store.approximate_bytes(0, None);
    assert!(empty < 64 << 10, "an empty store measures {empty} bytes");
    let (view, _) = store.apply_view(spec("v", 0)).unwrap();
    for batch in 0..20 {
        let rows: Vec<RowWrite> = (0..1000)
            .map(|i| row(&format!("driver-{batch}-{i}"), 1, i))
            .collect();
        store.write_rows(view.id, &rows).unwrap();
    }
    store.flush().unwrap();
    const MIDDLE: u64 = 1 << 63;
    let whole = store.approximate_bytes(0, None);
    let low = store.approximate_bytes(0, Some(MIDDLE));
    let high = store.approximate_bytes(MIDDLE, None);
    assert!(whole > 200_000, "{whole}");
    for half in [low, high] {
        assert!(
            half > whole / 4 && half < whole * 3 / 4,
            "halves {low} and {high} of {whole}"
        );
    }
    store.delete_hash_range_with(MIDDLE, None, &[]).unwrap();
    store.flush().unwrap();
    let kept = store.approximate_bytes(0, Some(MIDDLE));
    assert!(
        kept < whole * 3 / 4,
        "the half kept measures {kept} of the {whole} the whole store did"
    );
}

#[test]
fn delete_rows_reports_what_existed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Arc::new(ManualClock::new(T0_US)));
    let (view, _) = store.apply_view(spec("v", 0)).unwrap();
    store
        .write_rows(view.id, &[row("a", 1, 1), row("b", 1, 1)])
        .unwrap();
    let deleted = store
        .delete_rows(view.id, &["a".into(), "a".into(), "zzz".into()])
        .unwrap();
    assert_eq!(deleted, vec![storage_key(view.id, b"a")]);
    assert_eq!(trips(&store, &view, "a"), None);
    assert!(trips(&store, &view, "b").is_some());
}

/// A new store in a temporary directory, with view "v" (no ttl).
fn store_with_view() -> (
    tempfile::TempDir,
    Arc<ManualClock>,
    StateStore,
    Arc<FeatureView>,
) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0_US));
    let store = open(dir.path(), clock.clone());
    let (view, _) = store.apply_view(spec("v", 0)).unwrap();
    (dir, clock, store, view)
}

/// Copies `store` into a checkpoint (as a snapshot or a split does) and
/// closes it: the checkpoint's directory (kept while it lives) and path.
fn checkpoint_and_close(store: StateStore) -> (tempfile::TempDir, std::path::PathBuf) {
    let checkpoint = tempfile::tempdir().unwrap();
    let copy = checkpoint.path().join("db");
    store.checkpoint_with_meta(&copy, b"absent").unwrap();
    drop(store);
    (checkpoint, copy)
}

/// A write whose rows are at least as new as anything its view stored reads
/// nothing; an older one reads the rows it could lose to. The bound lives
/// on across a reopen and in a checkpoint (a snapshot, a split's child).
#[test]
fn writes_newer_than_anything_stored_read_nothing() {
    let (dir, clock, store, view) = store_with_view();
    let (other, _) = store.apply_view(spec("w", 0)).unwrap();
    store
        .write_rows(view.id, &[row("a", 10, 1), row("b", 10, 1)])
        .unwrap();
    // Equal event times win without a read; so does any row of a view that
    // stored nothing yet.
    store.write_rows(view.id, &[row("a", 10, 2)]).unwrap();
    store.write_rows(other.id, &[row("a", 1, 1)]).unwrap();
    assert_eq!(store.stats().rows_compared, 0);
    assert_eq!(trips(&store, &view, "a"), Some((10, 2)));
    // One batch, one key twice, newest first: the second loses without a
    // read (the first set the batch's own latest).
    let outcome = store
        .write_rows(view.id, &[row("c", 20, 1), row("c", 15, 2)])
        .unwrap();
    assert_eq!((outcome.rows_applied, outcome.rows_stale), (1, 1));
    assert_eq!(trips(&store, &view, "c"), Some((20, 1)));
    // "a" is older than what its key-hash bucket holds: read, and judged
    // against the stored row. "b" is older than the view's newest (20) but
    // not than anything its bucket got; "d" is newer than all: not read.
    let bucket = |key: &str| newest::bucket(&storage_key(view.id, key.as_bytes()));
    assert!(bucket("b") != bucket("c") && bucket("b") != bucket("a"));
    let outcome = store
        .write_rows(view.id, &[row("a", 9, 3), row("b", 11, 3), row("d", 30, 3)])
        .unwrap();
    assert_eq!((outcome.rows_applied, outcome.rows_stale), (2, 1));
    assert_eq!(store.stats().rows_compared, 1);
    assert_eq!(trips(&store, &view, "a"), Some((10, 2)));
    assert_eq!(trips(&store, &view, "b"), Some((11, 3)));

    let (_checkpoint, copy) = checkpoint_and_close(store);
    for path in [dir.path(), copy.as_path()] {
        let store = open(path, clock.clone());
        let outcome = store.write_rows(view.id, &[row("d", 29, 4)]).unwrap();
        assert_eq!(outcome.rows_stale, 1, "{path:?}");
        assert_eq!(store.stats().rows_compared, 1, "{path:?}");
        assert_eq!(trips(&store, &view, "d"), Some((30, 3)));
        store.write_rows(view.id, &[row("e", 30, 4)]).unwrap();
        assert_eq!(store.stats().rows_compared, 1, "{path:?}");
    }
}

/// A reopen (or a checkpoint's open) trusts the stored bounds when nothing
/// wrote since the store's last write: here the bound (100) outlives the
/// rows a range delete removed, so an older write still reads, where a
/// rescan would have found no rows.
#[test]
fn a_clean_reopen_trusts_the_stored_bounds() {
    let (dir, clock, store, view) = store_with_view();
    store.write_rows(view.id, &[row("a", 100, 1)]).unwrap();
    store.delete_hash_range_with(0, None, &[]).unwrap();
    store.advance_expiry(&[(view.id, 1)], &[]).unwrap();
    store.put_meta(&[(b"x", Some(b"y"))]).unwrap();
    let (_checkpoint, copy) = checkpoint_and_close(store);
    for path in [dir.path(), copy.as_path()] {
        let store = open(path, clock.clone());
        store.write_rows(view.id, &[row("a", 50, 2)]).unwrap();
        assert_eq!(store.stats().rows_compared, 1, "{path:?}");
    }
}

/// Rows written by something that does not keep the bounds (a build from
/// before them, or one rolled back to and then left again) are measured at
/// the next open: a write older than them is still judged against them.
#[test]
fn rows_written_without_the_bounds_are_measured_at_open() {
    let (dir, clock, store, view) = store_with_view();
    store.write_rows(view.id, &[row("a", 100, 1)]).unwrap();
    // An older build overwrites "a" with a newer row; the stored bound
    // stays at 100.
    let mut newer = Vec::new();
    codec::encode_row_parts(500, T0_US, &row("a", 500, 5).values, &mut newer);
    store
        .put_raw_for_test(&storage_key(view.id, b"a"), &newer)
        .unwrap();
    // A write after it must not make the next open trust the bounds.
    store.write_rows(view.id, &[row("z", 1, 1)]).unwrap();
    drop(store);
    let store = open(dir.path(), clock.clone());
    let outcome = store.write_rows(view.id, &[row("a", 300, 3)]).unwrap();
    assert_eq!(outcome.rows_stale, 1);
    assert_eq!(trips(&store, &view, "a"), Some((500, 5)));
    // A store from before the bounds: neither the bounds nor the sequence.
    store
        .put_meta(&[(newest_event_key(view.id).as_slice(), None)])
        .unwrap();
    store
        .db
        .delete_cf(store.cf(CF_META), META_LAST_WRITE_SEQ)
        .unwrap();
    drop(store);
    for _ in 0..2 {
        let store = open(dir.path(), clock.clone());
        let outcome = store
            .write_rows(view.id, &[row("a", 400, 4), row("b", 600, 6)])
            .unwrap();
        assert_eq!((outcome.rows_applied, outcome.rows_stale), (1, 1));
        assert_eq!(store.stats().rows_compared, 1);
        assert_eq!(trips(&store, &view, "a"), Some((500, 5)));
    }
}

/// A row that cannot be read bounds nothing when the bounds are measured:
/// any write replaces it, as before, and the view's other writes still skip
/// the read.
#[test]
fn an_unreadable_row_does_not_hold_its_view_s_bound_up() {
    let (dir, clock, store, view) = store_with_view();
    store.write_rows(view.id, &[row("a", 100, 1)]).unwrap();
    store
        .put_raw_for_test(&storage_key(view.id, b"bad"), &[1, 2, 3])
        .unwrap();
    drop(store);
    let store = open(dir.path(), clock.clone());
    store
        .write_rows(view.id, &[row("bad", 100, 2), row("b", 101, 2)])
        .unwrap();
    assert_eq!(store.stats().rows_compared, 0);
    assert_eq!(trips(&store, &view, "bad"), Some((100, 2)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// The store against a map model: after any sequence of batches, every key
    /// holds the value of its greatest event time, the latest among equals.
    /// A batch flagged `reopen` reopens the store first (the newest-event
    /// bounds must survive it).
    #[test]
    fn matches_a_last_write_wins_model(batches in proptest::collection::vec(
        (proptest::collection::vec((0u8..6, 0i64..20, any::<i64>()), 1..10), any::<bool>()), 1..12)) {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(T0_US));
        let mut store = open(dir.path(), clock.clone());
        let (view, _) = store.apply_view(spec("v", 0)).unwrap();
        let mut model: std::collections::BTreeMap<String, (i64, i64)> = Default::default();
        for (batch, reopen) in &batches {
            if *reopen {
                drop(store);
                store = open(dir.path(), clock.clone());
            }
            let rows: Vec<RowWrite> = batch.iter().map(|(k, ts, v)| row(&format!("k{k}"), *ts, *v)).collect();
            store.write_rows(view.id, &rows).unwrap();
            for (k, ts, v) in batch {
                let entry = model.entry(format!("k{k}")).or_insert((*ts, *v));
                if *ts >= entry.0 {
                    *entry = (*ts, *v);
                }
            }
        }
        for k in 0..6 {
            let key = format!("k{k}");
            prop_assert_eq!(trips(&store, &view, &key), model.get(&key).copied());
        }
    }

    /// Deletes take part in last-write-wins: a deleted row leaves a
    /// tombstone at its event time, and a write arriving later wins only if
    /// its event time is not older (the same rule as between rows). Expiry
    /// floors (op key 4) make everything below them absent and refuse
    /// writes below them, compacted or not.
    #[test]
    fn deletes_and_expiry_follow_the_last_write_wins_model(ops in proptest::collection::vec(
        (0u8..5, 0i64..20, proptest::option::of(any::<i64>()), any::<bool>()), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Arc::new(ManualClock::new(T0_US)));
        let (view, _) = store.apply_view(spec("v", 0)).unwrap();
        // Per key: the newest event time and the value (None: deleted).
        let mut model: std::collections::BTreeMap<String, (i64, Option<i64>)> = Default::default();
        let mut floor = i64::MIN;
        for (k, ts, value, compact) in &ops {
            if *k == 4 {
                store.advance_expiry(&[(view.id, *ts)], &[]).unwrap();
                floor = floor.max(*ts);
                if *compact {
                    store.compact_data().unwrap();
                }
                continue;
            }
            let key = format!("k{k}");
            let current = model.get(&key).copied().filter(|(at, _)| *at >= floor);
            match value {
                Some(v) => {
                    store.write_rows(view.id, &[row(&key, *ts, *v)]).unwrap();
                    if *ts >= floor && current.is_none_or(|(at, _)| *ts >= at) {
                        model.insert(key, (*ts, Some(*v)));
                    }
                }
                None => {
                    let deleted = store.delete_rows_with(view.id, std::slice::from_ref(&key), *ts, &[]).unwrap();
                    let had_row = current.is_some_and(|(_, v)| v.is_some());
                    prop_assert_eq!(deleted.len(), usize::from(had_row));
                    if let Some((at, Some(_))) = current {
                        model.insert(key, (at, None));
                    }
                }
            }
        }
        for k in 0..4 {
            let key = format!("k{k}");
            let expected = model
                .get(&key)
                .filter(|(at, _)| *at >= floor)
                .and_then(|&(ts, v)| v.map(|v| (ts, v)));
            prop_assert_eq!(trips(&store, &view, &key), expected);
        }
    }
}

#[test]
fn an_older_write_arriving_after_a_delete_stays_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Arc::new(ManualClock::new(T0_US)));
    let (view, _) = store.apply_view(spec("v", 0)).unwrap();
    store.write_rows(view.id, &[row("a", 300, 1)]).unwrap();
    assert_eq!(store.delete_rows(view.id, &["a".into()]).unwrap().len(), 1);
    // Out-of-order materialization: an event older than the deleted row.
    let outcome = store.write_rows(view.id, &[row("a", 150, 2)]).unwrap();
    assert_eq!(outcome.rows_stale, 1);
    assert_eq!(trips(&store, &view, "a"), None);
    // Deleting again deletes nothing; the tombstone stays as it was.
    assert!(
        store
            .delete_rows(view.id, &["a".into()])
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .write_rows(view.id, &[row("a", 299, 2)])
            .unwrap()
            .rows_stale,
        1
    );
    // A write at least as new brings the entity back.
    store.write_rows(view.id, &[row("a", 300, 3)]).unwrap();
    assert_eq!(trips(&store, &view, "a"), Some((300, 3)));
    // Tombstones survive a compaction of a view without ttl and a reopen.
    store.write_rows(view.id, &[row("b", 500, 1)]).unwrap();
    store.delete_rows(view.id, &["b".into()]).unwrap();
    store.compact_data().unwrap();
    drop(store);
    let store = open(dir.path(), Arc::new(ManualClock::new(T0_US)));
    assert_eq!(
        store
            .write_rows(view.id, &[row("b", 400, 2)])
            .unwrap()
            .rows_stale,
        1
    );
    assert_eq!(trips(&store, &view, "b"), None);
}

/// The Raft log is purged up to a snapshot, and the store never fsyncs its
/// own WAL: that is safe only because taking the snapshot's checkpoint
/// flushes the live store's memtables into table files first. If that ever
/// stops being true (a checkpoint that copies the WAL instead), a crash
/// after a purge loses applied entries the log no longer has. This test
/// fails then: after a checkpoint, the live store's directory without its
/// WAL files still holds everything applied before it.
#[test]
fn a_checkpoint_leaves_nothing_applied_only_in_the_unsynced_wal() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let store = open(&live, Arc::new(ManualClock::new(T0_US)));
    let (view, _) = store.apply_view(spec("v", 0)).unwrap();
    store
        .write_rows(view.id, &[row("a", 100, 1), row("b", 100, 2)])
        .unwrap();
    store
        .put_meta(&[(&b"applied"[..], Some(&b"42"[..]))])
        .unwrap();
    store
        .checkpoint_with_meta(&dir.path().join("snapshot"), b"applied")
        .unwrap();

    // A power loss now: everything the OS had not written out of the WAL is
    // gone. Copy the live directory without its WAL files and open that.
    let after_crash = dir.path().join("after-crash");
    std::fs::create_dir(&after_crash).unwrap();
    let mut wal_files = 0;
    for entry in std::fs::read_dir(&live).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            wal_files += 1;
            continue;
        }
        if path.is_file() {
            std::fs::copy(&path, after_crash.join(path.file_name().unwrap())).unwrap();
        }
    }
    assert!(wal_files > 0, "the store keeps a WAL");
    drop(store);
    let reopened = open(&after_crash, Arc::new(ManualClock::new(T0_US)));
    let view = reopened
        .registry()
        .load()
        .view("v")
        .cloned()
        .expect("view kept");
    assert_eq!(trips(&reopened, &view, "a"), Some((100, 1)));
    assert_eq!(trips(&reopened, &view, "b"), Some((100, 2)));
    assert_eq!(
        reopened.get_meta(b"applied").unwrap().as_deref(),
        Some(&b"42"[..])
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    /// A split's range delete removes exactly the rows whose key hash lies
    /// in the range, whatever the cut points (the ring's ends included).
    #[test]
    fn a_hash_range_delete_removes_exactly_its_range(
        keys in proptest::collection::btree_set("[a-z]{1,8}", 1..40),
        from in any::<u64>(),
        to in proptest::option::of(any::<u64>()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Arc::new(ManualClock::new(T0_US)));
        let (view, _) = store.apply_view(spec("v", 0)).unwrap();
        let rows: Vec<RowWrite> = keys.iter().map(|k| row(k, 1, 1)).collect();
        store.write_rows(view.id, &rows).unwrap();
        store.delete_hash_range_with(from, to, &[(b"k", Some(b"v"))]).unwrap();
        prop_assert_eq!(store.get_meta(b"k").unwrap(), Some(b"v".to_vec()));
        for key in &keys {
            let hash = crate::keys::entity_hash(key.as_bytes());
            let gone = hash >= from && to.is_none_or(|to| hash < to);
            prop_assert_eq!(trips(&store, &view, key).is_none(), gone, "{} {:#x}", key, hash);
        }
    }
}

#[test]
fn records_come_back_a_page_at_a_time_with_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Arc::new(ManualClock::new(T0_US)));
    let (view, _) = store.apply_view(spec("drivers", 0)).unwrap();
    let rows: Vec<RowWrite> = (0..25).map(|i| row(&format!("d{i}"), T0_US, i)).collect();
    store.write_rows(view.id, &rows).unwrap();
    store
        .delete_rows(view.id, &["d3".to_owned(), "d7".to_owned()])
        .unwrap();
    let mut seen = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.records_after(after.as_deref(), 4).unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 4);
        after = page.last().map(|(key, _)| key.clone());
        seen.extend(page);
    }
    assert_eq!(seen.len(), 25, "every record once, tombstones included");
    let keys: Vec<&Vec<u8>> = seen.iter().map(|(k, _)| k).collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "in key order");
    let tombstones: Vec<String> = seen
        .iter()
        .filter(|(_, row)| row.is_none())
        .map(|(key, _)| {
            let (_, _, entity) = crate::keys::split_storage_key(key).unwrap();
            String::from_utf8(entity.to_vec()).unwrap()
        })
        .collect();
    assert_eq!(tombstones.len(), 2);
    assert!(tombstones.contains(&"d3".to_owned()) && tombstones.contains(&"d7".to_owned()));
    assert_eq!(store.digest(0, None).unwrap().rows, 25);
}

/// A replica's content splits its rows into those inside a hash range and
/// those outside it, adding up to the whole store, with the meta values
/// and the range read from the same snapshot.
#[test]
fn replica_content_counts_rows_inside_and_outside_its_range() {
    let (_dir, _clock, store, view) = store_with_view();
    let keys: Vec<String> = (0..100).map(|i| format!("driver-{i}")).collect();
    let rows: Vec<RowWrite> = keys.iter().map(|k| row(k, T0_US, 1)).collect();
    store.write_rows(view.id, &rows).unwrap();
    store.put_meta(&[(b"position", Some(&b"7"[..]))]).unwrap();
    let middle = 1u64 << 63;
    let below = keys
        .iter()
        .filter(|k| crate::keys::entity_hash(k.as_bytes()) < middle)
        .count() as u64;
    assert!(below > 0 && below < 100, "{below} keys below the middle");

    let mut seen = Vec::new();
    let content = store
        .replica_content(&[b"position", b"absent"], |meta| {
            seen = meta.to_vec();
            Ok((middle, None))
        })
        .unwrap();
    assert_eq!(seen, vec![Some(b"7".to_vec()), None]);
    assert_eq!(content.meta, seen);
    assert_eq!((content.from_hash, content.to_hash), (middle, None));
    assert_eq!(content.inside.live.rows, 100 - below);
    assert_eq!(content.outside.rows_stored(), below);
    let mut whole = content.inside;
    whole.merge(content.outside);
    assert_eq!(whole, store.content_digest(0, None).unwrap());

    let low = store
        .replica_content(&[], |_| Ok((0, Some(middle))))
        .unwrap();
    assert_eq!(low.inside.live.rows, below);
    assert_eq!(low.outside, content.inside);
    // A range picker's error is the call's.
    let refused = store.replica_content(&[], |_| {
        Err(EngineError::Corrupt {
            what: "range".into(),
            reason: "test".into(),
        })
    });
    assert!(refused.is_err());
}
