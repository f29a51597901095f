//! Criterion micro-benchmarks of the serve path's parts: row encoding, the
//! engine's get and put, the hot cache, key hashing.

// criterion_group! generates undocumented public functions.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use quiver_engine::codec::{decode_row, encode_row_to_vec};
use quiver_engine::keys::{entity_hash, storage_key};
use quiver_engine::view::FeatureSpec;
use quiver_engine::{
    RowWrite, StateStore, StoreOptions, StoredRow, SystemClock, Value, ValueType, ViewSpec,
};
use quiver_server::cache::{HotCache, Lookup};

fn sample_row() -> StoredRow {
    let mut values: Vec<(u32, Value)> = (1..=5)
        .map(|i| (i, Value::Double(i as f64 * 1.5)))
        .collect();
    values.extend((6..=8).map(|i| (i, Value::Int64(i as i64 * 1000))));
    values.push((9, Value::Float(0.25)));
    values.push((10, Value::String("seg-00012345678".into())));
    StoredRow {
        event_ts_us: 1_700_000_000_000_000,
        written_ts_us: 1_700_000_000_000_100,
        values,
    }
}

fn codec(c: &mut Criterion) {
    let row = sample_row();
    let bytes = encode_row_to_vec(&row);
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode_row_10_features", |b| {
        b.iter(|| encode_row_to_vec(std::hint::black_box(&row)))
    });
    group.bench_function("decode_row_10_features", |b| {
        b.iter(|| decode_row(std::hint::black_box(&bytes)))
    });
    group.finish();
}

fn keys(c: &mut Criterion) {
    let mut group = c.benchmark_group("keys");
    group.bench_function("entity_hash_16_bytes", |b| {
        b.iter(|| entity_hash(std::hint::black_box(b"user:0000123456")))
    });
    group.bench_function("storage_key", |b| {
        b.iter(|| storage_key(7, std::hint::black_box(b"user:0000123456")))
    });
    let cluster = quiver_server::config::ClusterConfig {
        nodes: (1..=3)
            .map(|id| quiver_server::config::NodeAddr {
                id,
                addr: format!("127.0.0.1:{}", 7470 + id),
                peer_addr: None,
            })
            .collect(),
        ..Default::default()
    };
    let layout = quiver_server::cluster::placement::StaticLayout::new(&cluster, "", "");
    let map = std::sync::Arc::new(layout.map.clone());
    let placement = quiver_server::cluster::placement::Placement::new(map.clone(), true);
    group.bench_function("shard_of_key_16_shards", |b| {
        b.iter(|| placement.shard_of_key(std::hint::black_box("user:0000123456")))
    });
    group.bench_function("placement_3_nodes_16_shards", |b| {
        b.iter(|| {
            quiver_server::cluster::placement::Placement::new(
                std::hint::black_box(map.clone()),
                true,
            )
        })
    });
    group.finish();
}

fn view_spec() -> ViewSpec {
    ViewSpec {
        name: "bench".into(),
        entities: vec!["user_id".into()],
        features: (0..10)
            .map(|i| FeatureSpec {
                name: format!("f{i}"),
                value_type: ValueType::Double,
                default: None,
            })
            .collect(),
        ttl_seconds: 0,
        description: String::new(),
    }
}

fn engine(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = StoreOptions {
        sync_writes: false,
        ..StoreOptions::default()
    };
    let store = StateStore::open(dir.path(), options).expect("open store");
    let (view, _) = store.apply_view(view_spec()).expect("apply view");
    let values: Vec<(u32, Value)> = (1..=10).map(|i| (i, Value::Double(i as f64))).collect();
    let entities = 100_000u64;
    for chunk in (0..entities).collect::<Vec<_>>().chunks(1000) {
        let rows: Vec<RowWrite> = chunk
            .iter()
            .map(|id| RowWrite {
                entity_key: format!("user:{id:010}"),
                event_ts_us: 1,
                values: values.clone(),
            })
            .collect();
        store.write_rows(view.id, &rows).expect("preload");
    }
    let mut group = c.benchmark_group("engine");
    let mut n = 0u64;
    group.throughput(Throughput::Elements(1));
    group.bench_function("put_single_row_no_fsync", |b| {
        b.iter(|| {
            n += 1;
            let row = RowWrite {
                entity_key: format!("user:{:010}", n % entities),
                event_ts_us: n as i64 + 1,
                values: values.clone(),
            };
            store
                .write_rows(view.id, std::slice::from_ref(&row))
                .expect("write")
        })
    });
    group.throughput(Throughput::Elements(100));
    group.bench_function("put_batch_100_rows_no_fsync", |b| {
        b.iter_batched(
            || {
                n += 100;
                (0..100)
                    .map(|i| RowWrite {
                        entity_key: format!("user:{:010}", (n + i) % entities),
                        event_ts_us: (n + i) as i64 + 1,
                        values: values.clone(),
                    })
                    .collect::<Vec<_>>()
            },
            |rows| store.write_rows(view.id, &rows).expect("write"),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("get_batch_100_rows", |b| {
        b.iter_batched(
            || {
                n += 7919;
                (0..100)
                    .map(|i| {
                        storage_key(
                            view.id,
                            format!("user:{:010}", (n + i * 97) % entities).as_bytes(),
                        )
                    })
                    .collect::<Vec<_>>()
            },
            |keys| store.get_rows(&keys),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn cache(c: &mut Criterion) {
    let cache = Arc::new(HotCache::new(
        256 << 20,
        Duration::ZERO,
        Arc::new(SystemClock),
    ));
    let row = Arc::new(sample_row());
    let keys: Vec<Vec<u8>> = (0..100_000u64)
        .map(|id| storage_key(1, format!("user:{id:010}").as_bytes()))
        .collect();
    for key in &keys {
        if let Lookup::Miss(Some(guard)) = cache.lookup(key) {
            cache.fill(guard, Some(row.clone()));
        }
    }
    let mut group = c.benchmark_group("cache");
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    group.bench_function("get_hit_1_thread", |b| {
        b.iter(|| {
            i = (i + 7) % keys.len();
            matches!(cache.lookup(&keys[i]), Lookup::Hit(_))
        })
    });
    group.bench_function("invalidate_then_fill", |b| {
        b.iter(|| {
            i = (i + 7) % keys.len();
            cache.invalidate(&[&keys[i]]);
            if let Lookup::Miss(Some(guard)) = cache.lookup(&keys[i]) {
                cache.fill(guard, Some(row.clone()));
            }
        })
    });
    // Two threads hitting the same cache: one measured, one background.
    group.bench_function("get_hit_2_threads", |b| {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let background = {
            let (cache, keys, stop) = (cache.clone(), keys.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut j = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    j = (j + 13) % keys.len();
                    std::hint::black_box(matches!(cache.lookup(&keys[j]), Lookup::Hit(_)));
                }
            })
        };
        b.iter(|| {
            i = (i + 7) % keys.len();
            matches!(cache.lookup(&keys[i]), Lookup::Hit(_))
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = background.join();
    });
    group.finish();
}

criterion_group! {
    name = micro;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = codec, keys, engine, cache
}
criterion_main!(micro);
