//! Support for Quiver's integration tests: start real `quiverd` processes on
//! loopback with ephemeral ports, talk to them over gRPC, stop them gracefully
//! or kill them with SIGKILL, and run `quiverctl`.
//!
//! Architecture invariant: tests reach nodes only through processes and the
//! public API, never by linking the server, so they exercise what users run.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use quiver_proto::v1 as pb;
use quiver_proto::v1::feature_store_client::FeatureStoreClient;
use tonic::transport::Channel;

pub mod counter;
pub mod dynamic;
pub mod linearizability;
pub mod links;
pub mod scrape;
pub mod tls;

/// How long a node may take to start or stop. Generous: CI has 2 cores.
pub const NODE_START_TIMEOUT: Duration = Duration::from_secs(60);

/// A gRPC client of one node.
pub type Client = FeatureStoreClient<Channel>;

/// Path of a workspace binary (`quiverd`, `quiverctl`): `QUIVER_BIN_DIR` if
/// set, else next to the test executable's `deps` directory, where cargo puts
/// the binaries it builds for the workspace's tests.
pub fn binary(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("QUIVER_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().context("locate the test executable")?;
            exe.parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .ok_or_else(|| anyhow!("no target dir"))?
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build it first (cargo build --bins) or set QUIVER_BIN_DIR",
            path.display()
        );
    }
    Ok(path)
}

/// A running `quiverd` process. Killed when dropped.
#[derive(Debug)]
pub struct Node {
    child: Child,
    addr: SocketAddr,
    peer_addr: SocketAddr,
    /// The `/metrics` address, once the node printed it.
    metrics_addr: MetricsSlot,
    listen: String,
    data_dir: PathBuf,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
    log_path: PathBuf,
    /// How this harness's clients connect when the node runs TLS.
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Node {
    /// Starts a node on `127.0.0.1:0` with its data in `data_dir` and extra
    /// flags, and waits until it answers.
    pub async fn start(data_dir: &Path, extra_args: &[&str]) -> Result<Node> {
        let mut node = Self::spawn_at(data_dir, "127.0.0.1:0", extra_args, &[])?;
        node.wait_ready().await?;
        Ok(node)
    }

    /// [`Self::start`] with environment variables for the node.
    pub async fn start_with_env(
        data_dir: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Node> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut node = Self::spawn_at(data_dir, "127.0.0.1:0", extra_args, &env)?;
        node.wait_ready().await?;
        Ok(node)
    }

    /// A client of the node's admin service.
    pub async fn admin(
        &self,
    ) -> Result<quiver_proto::admin::admin_client::AdminClient<tonic::transport::Channel>> {
        Ok(quiver_proto::admin::admin_client::AdminClient::new(
            self.channel().await?,
        ))
    }

    /// A new connection to the node (over TLS when the node runs it, with
    /// the test CA's `client` certificate).
    pub async fn channel(&self) -> Result<Channel> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(self.endpoint())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30));
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        endpoint
            .connect()
            .await
            .with_context(|| format!("connect to {}", self.addr))
    }

    /// Starts a node on a fixed address without waiting for it.
    fn spawn_at(
        data_dir: &Path,
        listen: &str,
        extra_args: &[&str],
        env: &[(String, String)],
    ) -> Result<Node> {
        let extra_args: Vec<String> = extra_args.iter().map(|s| (*s).to_owned()).collect();
        let log_path = data_dir.with_extension("log");
        let (child, addr, peer_addr, metrics_addr) =
            spawn(data_dir, listen, &extra_args, env, &log_path)?;
        let tls = match env.iter().find(|(k, _)| k == tls::CA_PATH_ENV) {
            Some((_, ca)) => Some(tls::harness_client_config(Path::new(ca))?),
            None => tls::process_client_config()?,
        };
        Ok(Node {
            child,
            addr,
            peer_addr,
            metrics_addr,
            listen: listen.to_owned(),
            data_dir: data_dir.to_path_buf(),
            extra_args,
            env: env.to_vec(),
            log_path,
            tls,
        })
    }

    /// The address of the node's `/metrics` listener (started with
    /// `--metrics-listen-addr`, port 0 allowed), as it printed it.
    pub async fn metrics_addr(&self) -> Result<SocketAddr> {
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        loop {
            if let Some(addr) = *self.metrics_addr.lock().map_err(|_| anyhow!("poisoned"))? {
                return Ok(addr);
            }
            if Instant::now() > deadline {
                bail!("quiverd printed no metrics address; log: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The node's gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node's peer listener (internal traffic only).
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// `http://addr` (`https://` with TLS), for clients.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Where the node's stderr goes.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// A new client connection.
    pub async fn client(&self) -> Result<Client> {
        Ok(FeatureStoreClient::new(self.channel().await?))
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        loop {
            // A node that refused to start says why in its log at once.
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "quiverd exited ({status}) before it was ready; log: {}",
                    self.log()
                );
            }
            let last_error = match self.client().await {
                Ok(mut client) => match client.status(pb::StatusRequest {}).await {
                    Ok(_) => return Ok(()),
                    // It answers; it wants a token (auth.tokens).
                    Err(e) if e.code() == tonic::Code::Unauthenticated => return Ok(()),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!(
                    "node {} not ready after {NODE_START_TIMEOUT:?}: {last_error}; log: {}",
                    self.addr,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGKILL: no flush, no cleanup.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill().context("SIGKILL quiverd")?;
        self.child.wait().context("reap quiverd")?;
        Ok(())
    }

    /// SIGSTOP: the process freezes with its state and sockets as they are
    /// (a long GC pause, a VM migration).
    pub fn pause(&self) -> Result<()> {
        self.signal("-STOP")
    }

    /// SIGCONT: a paused process runs on, still believing what it believed.
    pub fn resume(&self) -> Result<()> {
        self.signal("-CONT")
    }

    /// SIGHUP: the node reads its TLS files again.
    pub fn hangup(&self) -> Result<()> {
        self.signal("-HUP")
    }

    fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .with_context(|| format!("run kill {signal}"))?;
        if !status.success() {
            bail!("kill {signal} failed");
        }
        Ok(())
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("run kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("quiverd exited with {status}; log: {}", self.log());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("quiverd did not stop within {NODE_START_TIMEOUT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sets (`Some`) or unsets an environment variable for the node's
    /// next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(value) = value {
            self.env.push((key.to_owned(), value.to_owned()));
        }
    }

    /// Starts the node again on the same data directory (the same address
    /// for cluster nodes, a new ephemeral port otherwise).
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            self.terminate()?;
        }
        let (child, addr, peer_addr, metrics_addr) = spawn(
            &self.data_dir,
            &self.listen,
            &self.extra_args,
            &self.env,
            &self.log_path,
        )?;
        self.child = child;
        self.addr = addr;
        self.peer_addr = peer_addr;
        self.metrics_addr = metrics_addr;
        self.wait_ready().await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test's data directory goes with its temporary dir: the
        // node's log is kept where a CI run can still be diagnosed.
        if std::thread::panicking() {
            keep_log(&self.log_path);
        }
    }
}

/// Copies a node's log to `$QUIVER_TEST_KEEP_LOGS` (default: the system
/// temporary dir's `quiver-failed-tests`) and says where.
fn keep_log(log_path: &Path) {
    let dir = std::env::var_os("QUIVER_TEST_KEEP_LOGS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("quiver-failed-tests"));
    let name = format!(
        "{}-{}-{}",
        std::process::id(),
        log_path
            .parent()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        log_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let kept = dir.join(name);
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::copy(log_path, &kept)) {
        Ok(_) => eprintln!("node log kept: {}", kept.display()),
        Err(e) => eprintln!("node log {} not kept: {e}", log_path.display()),
    }
}

/// Where the output reader puts the metrics address when it sees it.
type MetricsSlot = std::sync::Arc<std::sync::Mutex<Option<SocketAddr>>>;

fn spawn(
    data_dir: &Path,
    listen: &str,
    extra_args: &[String],
    env: &[(String, String)],
    log_path: &Path,
) -> Result<(Child, SocketAddr, SocketAddr, MetricsSlot)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)?;
    let mut child = Command::new(binary("quiverd")?)
        .arg("--listen-addr")
        .arg(listen)
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra_args)
        .env_remove("QUIVER_CONFIG")
        .env_remove("QUIVER_BIN_DIR")
        // Tests place leaders where they want them: the leader balancer is
        // on only where a test turns it on (the nemesis, its own test).
        .env("QUIVER_CLUSTER__BALANCE_LEADERS", "false")
        // The tests were written for a cluster of many groups (a batch that
        // fans out over shards, a node leading several): 16 unless a test
        // asks for another count (the product's default is one; the
        // scale-out test in tests/dynamic.rs starts with one per node).
        .env("QUIVER_CLUSTER__SHARD_COUNT", "16")
        // QUIVER_TEST_LOG picks the nodes' log filter when debugging a test
        // (e.g. "info,quiver_server=debug"); a test's own QUIVER_LOG wins.
        .env(
            "QUIVER_LOG",
            std::env::var("QUIVER_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
        )
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .context("spawn quiverd")?;
    let stdout = child.stdout.take().context("quiverd stdout")?;
    // Read the "listening on" line on a thread so a silent child cannot hang
    // the test past its deadline.
    let (tx, rx) = mpsc::channel();
    let metrics_slot = MetricsSlot::default();
    let metrics_seen = metrics_slot.clone();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        // The client address, then the peer address.
        let first = lines.next().and_then(Result::ok);
        let second = lines.next().and_then(Result::ok);
        let _ = tx.send(first.zip(second));
        // Keep draining so the child never blocks on a full pipe; the
        // metrics address, if any, comes once the node is open.
        for line in lines.map_while(Result::ok) {
            if let Some(addr) = line
                .strip_prefix("quiverd metrics on ")
                .and_then(|a| a.parse().ok())
                && let Ok(mut slot) = metrics_seen.lock()
            {
                *slot = Some(addr);
            }
        }
    });
    let (line, peer_line) = match rx.recv_timeout(NODE_START_TIMEOUT) {
        Ok(Some(lines)) => lines,
        other => {
            let _ = child.kill();
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            bail!("quiverd did not report its address ({other:?}); log: {log}");
        }
    };
    let addr = line
        .strip_prefix("quiverd listening on ")
        .ok_or_else(|| anyhow!("unexpected first line from quiverd: {line:?}"))?
        .parse()
        .with_context(|| format!("parse address in {line:?}"))?;
    let peer_addr = peer_line
        .strip_prefix("quiverd peers on ")
        .ok_or_else(|| anyhow!("unexpected second line from quiverd: {peer_line:?}"))?
        .parse()
        .with_context(|| format!("parse address in {peer_line:?}"))?;
    Ok((child, addr, peer_addr, metrics_slot))
}

/// A file of the workspace, by its path from the workspace root. Found
/// from the directory cargo runs the test in (`CARGO_MANIFEST_DIR` at run
/// time), not the one it was compiled in: a shared target directory may
/// hold a test binary built from another checkout of the same sources.
pub fn workspace_path(relative: &str) -> PathBuf {
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    crate_dir.join("..").join(relative)
}

/// A cluster of `quiverd` processes on loopback, each with its own data
/// directory, all given the same static description.
#[derive(Debug)]
pub struct Cluster {
    /// The nodes; node id `i + 1` is `nodes[i]`.
    pub nodes: Vec<Node>,
    /// The peer links' proxies, when started with them.
    pub links: Option<std::sync::Arc<links::Links>>,
    /// Nodes the cluster has room for, not started yet (see
    /// [`Self::join_spare`]).
    spares: Vec<Spare>,
    root: PathBuf,
    env: Vec<(String, String)>,
}

/// A node a cluster was started with room for: its ports are held, and the
/// other nodes route to it through their links to it (given to them in
/// `cluster.peer_routes`), until [`Cluster::join_spare`] starts it.
#[derive(Debug)]
struct Spare {
    id: u64,
    client: std::net::TcpListener,
    peer: std::net::TcpListener,
    /// Its own `cluster.peer_routes`: to each other node through its links.
    routes: String,
}

/// The cluster secret test clusters share: every test cluster
/// authenticates its peers, as production should.
pub const TEST_CLUSTER_SECRET: &str = "quiver-test-cluster-secret";

impl Cluster {
    /// Starts `count` nodes under `root` and waits until each answers.
    /// Ports are picked by the OS (bind to port 0, then released), so the
    /// description can name them before the nodes start. `env` tunes
    /// replication (`QUIVER_CLUSTER__...`).
    pub async fn start(root: &Path, count: usize, env: &[(&str, &str)]) -> Result<Cluster> {
        Self::start_inner(root, count, 0, env, false).await
    }

    /// [`Self::start`] with every node's peer traffic to every other node
    /// through a proxy of [`links::Links`], so tests can partition them.
    pub async fn start_with_links(
        root: &Path,
        count: usize,
        env: &[(&str, &str)],
    ) -> Result<Cluster> {
        Self::start_inner(root, count, 0, env, true).await
    }

    /// [`Self::start_with_links`] with room for `spares` more nodes, ids
    /// `count + 1...`, which [`Self::join_spare`] starts later: their links
    /// exist from the start, so they can be cut like the first nodes'.
    pub async fn start_with_links_and_spares(
        root: &Path,
        count: usize,
        spares: usize,
        env: &[(&str, &str)],
    ) -> Result<Cluster> {
        Self::start_inner(root, count, spares, env, true).await
    }

    async fn start_inner(
        root: &Path,
        count: usize,
        spares: usize,
        env: &[(&str, &str)],
        with_links: bool,
    ) -> Result<Cluster> {
        // A client and a peer port per node, held until the proxies have
        // their own ports (so none of them takes a node's); a spare's until
        // it starts.
        let total = count + spares;
        let mut reserved: Vec<(std::net::TcpListener, std::net::TcpListener)> = (0..total)
            .map(|_| {
                Ok((
                    std::net::TcpListener::bind("127.0.0.1:0")?,
                    std::net::TcpListener::bind("127.0.0.1:0")?,
                ))
            })
            .collect::<std::io::Result<_>>()?;
        let mut client_ports = Vec::new();
        let mut peer_ports = Vec::new();
        for (client, peer) in &reserved {
            client_ports.push(client.local_addr()?.port());
            peer_ports.push(peer.local_addr()?.port());
        }
        let links = with_links.then(|| std::sync::Arc::new(links::Links::default()));
        // How node `from` reaches node `to`'s peer port: through the
        // `from -> to` proxy when there are links.
        let route = async |from: u64, to: u64| -> Result<SocketAddr> {
            let target: SocketAddr =
                format!("127.0.0.1:{}", peer_ports[(to - 1) as usize]).parse()?;
            match &links {
                Some(links) if from != to => links.add(from, to, target).await,
                _ => Ok(target),
            }
        };
        // Node i's view of the cluster: the description (the first
        // `count`), and routes to the others (spares; and for a spare, to
        // every other node) when they go through links.
        let mut descriptions = Vec::new();
        let mut routes = Vec::new();
        for from in 1..=total as u64 {
            let mut parts = Vec::new();
            let mut via = Vec::new();
            for to in 1..=total as u64 {
                let peer = route(from, to).await?;
                if from <= count as u64 && to <= count as u64 {
                    let client = client_ports[(to - 1) as usize];
                    parts.push(format!("{to}=127.0.0.1:{client}/{peer}"));
                } else if links.is_some() && from != to {
                    via.push(format!("{to}={peer}"));
                }
            }
            descriptions.push(parts.join(","));
            routes.push(via.join(","));
        }
        let spare_listeners = reserved.split_off(count);
        drop(reserved);
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        if !env.iter().any(|(k, _)| k == "QUIVER_CLUSTER__SECRET") {
            env.push((
                "QUIVER_CLUSTER__SECRET".to_owned(),
                TEST_CLUSTER_SECRET.to_owned(),
            ));
        }
        let mut nodes = Vec::new();
        for i in 0..count {
            let id = (i + 1).to_string();
            let data_dir = root.join(format!("node{id}"));
            let listen = format!("127.0.0.1:{}", client_ports[i]);
            let peer_listen = format!("127.0.0.1:{}", peer_ports[i]);
            let mut node_env = env.clone();
            if !routes[i].is_empty() {
                node_env.push(("QUIVER_CLUSTER__PEER_ROUTES".to_owned(), routes[i].clone()));
            }
            nodes.push(Node::spawn_at(
                &data_dir,
                &listen,
                &[
                    "--node-id",
                    &id,
                    "--cluster-nodes",
                    &descriptions[i],
                    "--peer-listen-addr",
                    &peer_listen,
                ],
                &node_env,
            )?);
        }
        for node in &mut nodes {
            node.wait_ready().await?;
        }
        let spares = spare_listeners
            .into_iter()
            .enumerate()
            .map(|(i, (client, peer))| Spare {
                id: (count + i + 1) as u64,
                client,
                peer,
                routes: routes[count + i].clone(),
            })
            .collect();
        Ok(Cluster {
            nodes,
            links,
            spares,
            root: root.to_owned(),
            env,
        })
    }

    /// Spare nodes not started yet.
    pub fn spares_left(&self) -> usize {
        self.spares.len()
    }

    /// Starts the next spare node with `--join` through node `through`,
    /// and waits until it answers as the node id it was planned as (the
    /// next id the cluster gives out). Returns that id.
    pub async fn join_spare(&mut self, through: u64) -> Result<u64> {
        if self.spares.is_empty() {
            bail!("no spare node left");
        }
        let spare = self.spares.remove(0);
        if spare.id != self.nodes.len() as u64 + 1 {
            bail!("spare {} is not the next node", spare.id);
        }
        let member = self.node(through).addr().to_string();
        let listen = format!("127.0.0.1:{}", spare.client.local_addr()?.port());
        let peer_listen = format!("127.0.0.1:{}", spare.peer.local_addr()?.port());
        let mut env = self.env.clone();
        if !spare.routes.is_empty() {
            env.push((
                "QUIVER_CLUSTER__PEER_ROUTES".to_owned(),
                spare.routes.clone(),
            ));
        }
        drop((spare.client, spare.peer));
        let data_dir = self.root.join(format!("node{}", spare.id));
        let mut node = Node::spawn_at(
            &data_dir,
            &listen,
            &["--join", &member, "--peer-listen-addr", &peer_listen],
            &env,
        )?;
        node.wait_ready().await?;
        let mut client = node.client().await?;
        let given = client
            .status(pb::StatusRequest {})
            .await?
            .into_inner()
            .node_id;
        self.nodes.push(node);
        if given != spare.id {
            bail!(
                "the spare planned as node {} joined as node {given}: its routes are wrong",
                spare.id
            );
        }
        Ok(spare.id)
    }

    /// Node `id` (1-based).
    pub fn node(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    /// Waits until every group on every running node knows a leader, and
    /// returns node 1..n's status (None for stopped nodes).
    pub async fn wait_for_leaders(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut missing = Vec::new();
            for (i, node) in self.nodes.iter_mut().enumerate() {
                if !node.is_running() {
                    continue;
                }
                match node.status().await {
                    Ok(status) => {
                        for group in status.groups {
                            if group.leader_id == 0 {
                                missing.push(format!("node {} group {}", i + 1, group.group));
                            }
                        }
                    }
                    Err(e) => missing.push(format!("node {}: {e}", i + 1)),
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no leader after {timeout:?}: {}", missing.join(", "));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Node {
    /// The node's status.
    pub async fn status(&self) -> Result<pb::StatusResponse> {
        Ok(self
            .client()
            .await?
            .status(pb::StatusRequest {})
            .await?
            .into_inner())
    }
}

/// An endpoint for `target` (a URL or `host:port`) with the harness's
/// timeouts: over TLS when this process's nodes run it
/// ([`tls::process_client_config`]), else plaintext.
pub fn endpoint(target: &str) -> Result<tonic::transport::Endpoint> {
    let host_port = target.split_once("://").map_or(target, |(_, rest)| rest);
    let tls = tls::process_client_config()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{host_port}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint)
}

/// Runs `quiverctl` against `endpoint`; returns stdout, or an error with
/// stderr if it failed.
pub fn quiverctl(endpoint: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(binary("quiverctl")?)
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run quiverctl")?;
    if !output.status.success() {
        bail!(
            "quiverctl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// Microseconds since the epoch, now.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// A wire int64 value.
pub fn int64(v: i64) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Int64Val(v)),
    }
}

/// A wire double value.
pub fn double(v: f64) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::DoubleVal(v)),
    }
}

/// A wire string value.
pub fn string(v: &str) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::StringVal(v.to_owned())),
    }
}

/// A feature spec.
pub fn feature(
    name: &str,
    value_type: pb::ValueType,
    default: Option<pb::Value>,
) -> pb::FeatureSpec {
    pb::FeatureSpec {
        name: name.to_owned(),
        r#type: value_type as i32,
        default_value: default,
    }
}

/// A row with named values.
pub fn row(key: &str, event_ts_us: i64, values: &[(&str, pb::Value)]) -> pb::WriteRow {
    pb::WriteRow {
        entity_key: key.to_owned(),
        event_ts_us,
        values: values
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.clone()))
            .collect(),
    }
}

/// Applies a feature view.
pub async fn apply_view(
    client: &mut Client,
    view: pb::FeatureView,
) -> Result<pb::ApplyFeatureViewResponse, tonic::Status> {
    client
        .apply_feature_view(pb::ApplyFeatureViewRequest { view: Some(view) })
        .await
        .map(|r| r.into_inner())
}

/// Writes rows of one view.
pub async fn write_rows(
    client: &mut Client,
    view: &str,
    rows: Vec<pb::WriteRow>,
) -> Result<pb::WriteResponse, tonic::Status> {
    client
        .write(pb::WriteRequest {
            view: view.into(),
            rows,
            request_id: Vec::new(),
        })
        .await
        .map(|r| r.into_inner())
}
