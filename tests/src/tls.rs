//! Certificates for TLS tests, made by `quiverctl tls` as an operator
//! would: a CA, a certificate for the nodes and one for clients.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The node setting naming the cluster CA; the harness's clients trust
/// it and present the `client` certificate of the same directory.
pub const CA_PATH_ENV: &str = "QUIVER_TLS__CA_PATH";

/// A CA directory: `ca.pem`, and `NAME.pem` / `NAME-key.pem` per
/// certificate it issued.
#[derive(Debug, Clone)]
pub struct TestCa {
    /// Where its files are.
    pub dir: PathBuf,
}

impl TestCa {
    /// A new CA in `dir`, with a `node` certificate for `127.0.0.1` and
    /// `localhost` and a (client-only) `client` certificate.
    pub fn new(dir: &Path) -> Result<TestCa> {
        let ca = TestCa {
            dir: dir.to_path_buf(),
        };
        ca.run(&["tls", "ca", "--dir"])?;
        ca.issue("node", &["127.0.0.1", "localhost"])?;
        ca.run(&["tls", "cert", "--name", "client", "--client", "--dir"])?;
        Ok(ca)
    }

    /// Issues a node certificate `NAME.pem` for `hosts`.
    pub fn issue(&self, name: &str, hosts: &[&str]) -> Result<()> {
        let mut args = vec!["tls", "cert", "--name", name];
        for host in hosts {
            args.extend(["--host", host]);
        }
        args.push("--dir");
        self.run(&args)
    }

    fn run(&self, args: &[&str]) -> Result<()> {
        let output = std::process::Command::new(crate::binary("quiverctl")?)
            .args(args)
            .arg(&self.dir)
            .output()
            .context("run quiverctl tls")?;
        if !output.status.success() {
            bail!(
                "quiverctl {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// A file of the CA's directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A node's settings to serve with the `node` certificate, taking
    /// only clients with a certificate from this CA if `client_certs`.
    pub fn node_env(&self, client_certs: bool) -> Vec<(String, String)> {
        let path = |file: &str| self.path(file).display().to_string();
        let mut env = vec![
            ("QUIVER_TLS__CERT_PATH".to_owned(), path("node.pem")),
            ("QUIVER_TLS__KEY_PATH".to_owned(), path("node-key.pem")),
            (CA_PATH_ENV.to_owned(), path("ca.pem")),
        ];
        if client_certs {
            env.push(("QUIVER_TLS__CLIENT_CA_PATH".to_owned(), path("ca.pem")));
        }
        env
    }

    /// A client that trusts this CA and presents `identity`'s certificate
    /// if given.
    pub fn client_config(&self, identity: Option<&str>) -> Result<ClientTlsConfig> {
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(self.path("ca.pem"))?));
        Ok(match identity {
            Some(name) => config.identity(self.identity(name)?),
            None => config,
        })
    }

    /// The certificate `NAME.pem` and its key, to present.
    pub fn identity(&self, name: &str) -> Result<Identity> {
        Ok(Identity::from_pem(
            std::fs::read(self.path(&format!("{name}.pem")))?,
            std::fs::read(self.path(&format!("{name}-key.pem")))?,
        ))
    }

    /// quiverctl's flags to trust this CA and present the `client`
    /// certificate.
    pub fn quiverctl_flags(&self) -> Vec<String> {
        let path = |file: &str| self.path(file).display().to_string();
        vec![
            "--ca".into(),
            path("ca.pem"),
            "--cert".into(),
            path("client.pem"),
            "--key".into(),
            path("client-key.pem"),
        ]
    }
}

/// The TLS this test process's nodes run when it was started with
/// `QUIVER_TLS__CA_PATH` (and the rest of `[tls]`) in its environment,
/// which every quiverd it starts inherits (`QUIVER_NEMESIS_TLS=1
/// scripts/nemesis.sh` does that); with `QUIVER_CA`, `QUIVER_CERT` and
/// `QUIVER_KEY` there too, every quiverctl it runs inherits TLS as well.
/// Read once per process: every connection of a campaign uses it.
pub fn process_client_config() -> Result<Option<ClientTlsConfig>> {
    static LOADED: std::sync::OnceLock<Result<Option<ClientTlsConfig>, String>> =
        std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| match std::env::var_os(CA_PATH_ENV) {
            Some(ca) => harness_client_config(Path::new(&ca))
                .map(Some)
                .map_err(|e| format!("{e:#}")),
            None => Ok(None),
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// How the harness connects to a node whose cluster CA is `ca_path`.
pub(crate) fn harness_client_config(ca_path: &Path) -> Result<ClientTlsConfig> {
    let dir = ca_path.parent().context("the CA path has no directory")?;
    let ca = TestCa {
        dir: dir.to_path_buf(),
    };
    let identity = ca.path("client.pem").is_file().then_some("client");
    ca.client_config(identity)
}
