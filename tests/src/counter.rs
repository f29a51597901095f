//! What cluster tests share: the `counter` view (one int64 feature), a
//! cluster per test run one at a time, and polling helpers that retry until a
//! generous deadline instead of sleeping (CI has 2 cores).

use std::time::{Duration, Instant};

use quiver_proto::v1 as pb;
use quiver_proto::v1::ValueType;

use crate::{Client, Cluster, apply_view, feature, int64, now_us, row, write_rows};

/// How long a test waits for leaders to be elected.
pub const LEADER_WAIT: Duration = Duration::from_secs(60);
/// How long a test waits for replicas to converge.
pub const CONVERGE_WAIT: Duration = Duration::from_secs(60);

/// The view every cluster test writes: `counter:value`, an int64.
pub fn counter_view() -> pb::FeatureView {
    pb::FeatureView {
        name: "counter".into(),
        entities: vec!["id".into()],
        features: vec![feature("value", ValueType::Int64, None)],
        ttl_seconds: 0,
        description: "cluster test view".into(),
        version: 0,
    }
}

/// One cluster at a time: three nodes with 17 groups each are enough for 2
/// cores; two clusters at once would make elections flap.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A running 3-node cluster, its data directory, and this test's turn.
/// When a test fails, the directory (data and every node's log) is kept and
/// its path printed.
pub struct Running {
    cluster: Cluster,
    dir: Option<tempfile::TempDir>,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!(
                "cluster data and node logs kept in {}",
                dir.keep().display()
            );
        }
    }
}

impl std::ops::Deref for Running {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }
}

/// Starts a 3-node cluster with `env` (`QUIVER_CLUSTER__...` tuning) once
/// no other test's cluster runs, and waits for every group's leader.
pub async fn start(env: &[(&str, &str)]) -> Running {
    start_cluster(env, false, 0).await
}

/// [`start`] with every peer link through a proxy (`cluster.links`), for
/// partitions.
pub async fn start_with_links(env: &[(&str, &str)]) -> Running {
    start_cluster(env, true, 0).await
}

/// [`start_with_links`] with room for `spares` nodes more, started later
/// with [`Cluster::join_spare`].
pub async fn start_with_links_and_spares(env: &[(&str, &str)], spares: usize) -> Running {
    start_cluster(env, true, spares).await
}

async fn start_cluster(env: &[(&str, &str)], with_links: bool, spares: usize) -> Running {
    let turn = ONE_CLUSTER.lock().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let started = if with_links {
        Cluster::start_with_links_and_spares(dir.path(), 3, spares, env).await
    } else {
        Cluster::start(dir.path(), 3, env).await
    };
    let mut cluster = started.expect("cluster starts");
    cluster
        .wait_for_leaders(LEADER_WAIT)
        .await
        .expect("every group elects a leader");
    Running {
        cluster,
        dir: Some(dir),
        _turn: turn,
    }
}

/// Tests that do not need every shard: fewer groups, less load.
pub const FOUR_SHARDS: [(&str, &str); 1] = [("QUIVER_CLUSTER__SHARD_COUNT", "4")];

/// Retries `f` until it succeeds; panics with its last error once the
/// deadline passes (leader elections, a node restarting).
pub async fn retry<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let until = Instant::now() + deadline;
    loop {
        match f().await {
            Ok(value) => return value,
            Err(e) if Instant::now() > until => {
                panic!("{what}: still failing after {deadline:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Reads `counter:value` of `keys`; an unavailable shard is an error.
pub async fn read_values(
    client: &mut Client,
    keys: &[String],
    consistency: pb::Consistency,
) -> Result<(Vec<Option<i64>>, Vec<pb::ReadSource>), String> {
    let response = client
        .get(pb::GetRequest {
            entity_keys: keys.to_vec(),
            features: vec!["counter:value".into()],
            consistency: consistency as i32,
            skip_cache: false,
            max_staleness_ms: 0,
            degraded: false,
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let mut values = Vec::new();
    for entity in &response.entities {
        let feature = &entity.features[0];
        if feature.status() == pb::FeatureStatus::Unavailable {
            return Err(format!("{} unavailable", entity.entity_key));
        }
        values.push(match feature.value.as_ref().and_then(|v| v.kind.clone()) {
            Some(pb::value::Kind::Int64Val(v)) => Some(v),
            _ => None,
        });
    }
    Ok((values, response.sources))
}

/// Retries a read of `keys` at `level` through `client` until it returns
/// `expected` (panics with the last read after [`CONVERGE_WAIT`]).
pub async fn wait_for_values(
    what: &str,
    client: &Client,
    keys: &[String],
    level: pb::Consistency,
    expected: &[Option<i64>],
) {
    retry(what, CONVERGE_WAIT, || {
        let (mut client, keys) = (client.clone(), keys.to_vec());
        async move {
            let (read, _) = read_values(&mut client, &keys, level).await?;
            if read == expected {
                Ok(())
            } else {
                Err(format!("{read:?}"))
            }
        }
    })
    .await;
}

/// Writes `counter:value` rows; a larger value gets a later event time.
pub async fn write_values(client: &mut Client, values: &[(String, i64)]) -> Result<(), String> {
    let ts = now_us();
    let rows = values
        .iter()
        .map(|(key, value)| row(key, ts + value, &[("value", int64(*value))]))
        .collect();
    write_rows(client, "counter", rows)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Applies the counter view, retrying while the metadata group elects.
pub async fn apply_counter_view(client: &Client) {
    retry("apply the view", LEADER_WAIT, || {
        let mut client = client.clone();
        async move {
            apply_view(&mut client, counter_view())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await;
}

/// `count` keys `prefix-0`, `prefix-1`, ...
pub fn keys(count: usize, prefix: &str) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i}")).collect()
}

/// The leader of `group` as the running nodes report it.
pub async fn leader_of(cluster: &mut Cluster, group: u32) -> u64 {
    retry("find leader", LEADER_WAIT, || {
        let statuses: Vec<_> = cluster
            .nodes
            .iter_mut()
            .filter_map(|n| n.is_running().then(|| n.addr()))
            .collect();
        async move {
            for addr in statuses {
                let mut client = connect(addr).await?;
                let status = client
                    .status(pb::StatusRequest {})
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                if let Some(g) = status
                    .groups
                    .iter()
                    .find(|g| g.group == group && g.role == "leader")
                {
                    return Ok(status.node_id.max(g.leader_id));
                }
            }
            Err(format!("no node leads group {group}"))
        }
    })
    .await
}

/// A client of the node at `addr`.
pub async fn connect(addr: std::net::SocketAddr) -> Result<Client, String> {
    let channel = crate::endpoint(&addr.to_string())
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(quiver_proto::v1::feature_store_client::FeatureStoreClient::new(channel))
}

/// Applies the counter view through `client`, writes `key = value` (retried
/// until a leader takes it), and returns the key's shard and its leader.
pub async fn write_and_locate(
    cluster: &mut Cluster,
    client: &Client,
    key: &str,
    value: i64,
) -> (u32, u64) {
    apply_counter_view(client).await;
    retry("first write", LEADER_WAIT, || {
        let (mut client, key) = (client.clone(), key.to_owned());
        async move { write_values(&mut client, &[(key, value)]).await }
    })
    .await;
    let mut probe = client.clone();
    let (_, sources) = read_values(&mut probe, &[key.to_owned()], pb::Consistency::Leader)
        .await
        .expect("read the key back");
    let shard = sources[0].shard;
    (shard, leader_of(cluster, shard).await)
}
