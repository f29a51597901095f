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
    data_dir: PathBuf,
    extra_args: Vec<String>,
    log_path: PathBuf,
}

impl Node {
    /// Starts a node on `127.0.0.1:0` with its data in `data_dir` and extra
    /// flags, and waits until it answers.
    pub async fn start(data_dir: &Path, extra_args: &[&str]) -> Result<Node> {
        let extra_args: Vec<String> = extra_args.iter().map(|s| (*s).to_owned()).collect();
        let log_path = data_dir.with_extension("log");
        let (child, addr) = spawn(data_dir, &extra_args, &log_path)?;
        let node = Node {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
            extra_args,
            log_path,
        };
        node.wait_ready().await?;
        Ok(node)
    }

    /// The node's gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`, for clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where the node's stderr goes.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// A new client connection.
    pub async fn client(&self) -> Result<Client> {
        let channel = tonic::transport::Endpoint::from_shared(self.endpoint())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .with_context(|| format!("connect to {}", self.addr))?;
        Ok(FeatureStoreClient::new(channel))
    }

    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        loop {
            let last_error = match self.client().await {
                Ok(mut client) => match client.status(pb::StatusRequest {}).await {
                    Ok(_) => return Ok(()),
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

    /// Starts the node again on the same data directory (a new port).
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            self.terminate()?;
        }
        let (child, addr) = spawn(&self.data_dir, &self.extra_args, &self.log_path)?;
        self.child = child;
        self.addr = addr;
        self.wait_ready().await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(data_dir: &Path, extra_args: &[String], log_path: &Path) -> Result<(Child, SocketAddr)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)?;
    let mut child = Command::new(binary("quiverd")?)
        .arg("--listen-addr")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra_args)
        .env_remove("QUIVER_CONFIG")
        .env("QUIVER_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .context("spawn quiverd")?;
    let stdout = child.stdout.take().context("quiverd stdout")?;
    // Read the "listening on" line on a thread so a silent child cannot hang
    // the test past its deadline.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next();
        let _ = tx.send(first);
        // Keep draining so the child never blocks on a full pipe.
        for _ in lines {}
    });
    let line = match rx.recv_timeout(NODE_START_TIMEOUT) {
        Ok(Some(Ok(line))) => line,
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
    Ok((child, addr))
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
        })
        .await
        .map(|r| r.into_inner())
}
