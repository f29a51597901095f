//! `quiverctl tls`: a local certificate authority for a cluster, and
//! certificates it issues for nodes and clients (for a demo, tests, or a
//! cluster without a company CA). Keys are written owner-only.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// Longest validity `--days` takes (10 years).
const DAYS_MAX: u64 = 3660;
/// Most host names on one certificate.
const HOSTS_MAX: usize = 64;

/// `quiverctl tls`.
#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Make a new CA: `ca.pem` and `ca-key.pem` in `--dir`.
    Ca(CaArgs),
    /// Issue a certificate from the CA in `--dir`: `NAME.pem` and
    /// `NAME-key.pem`, for a node (`--host`...) or a client (`--client`).
    Cert(CertArgs),
}

/// `quiverctl tls ca`.
#[derive(Debug, Args)]
pub struct CaArgs {
    /// Where to write it (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// The CA's common name.
    #[arg(long, default_value = "Quiver local CA")]
    name: String,
    /// Days it is valid.
    #[arg(long, default_value_t = 3650)]
    days: u64,
    /// Replace a CA already there (every certificate it issued stops being
    /// trusted by nodes given the new one).
    #[arg(long)]
    force: bool,
}

/// `quiverctl tls cert`.
#[derive(Debug, Args)]
pub struct CertArgs {
    /// The CA's directory (holds `ca.pem` and `ca-key.pem`); the
    /// certificate is written there too.
    #[arg(long)]
    dir: PathBuf,
    /// File name and common name (letters, digits, `-`, `_`, `.`).
    #[arg(long)]
    name: String,
    /// A DNS name or IP address the certificate is valid for (repeat; no
    /// wildcards). A node's must cover the hosts of its client and peer
    /// addresses.
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// A client's certificate: for client use only and naming no host, so
    /// it can never pass for a node's on the peer port. Without it the
    /// certificate is a node's (server and client use).
    #[arg(long, conflicts_with = "hosts")]
    client: bool,
    /// Days it is valid.
    #[arg(long, default_value_t = 365)]
    days: u64,
}

/// Runs a `quiverctl tls` command.
pub fn run(command: &TlsCommand, json: bool) -> Result<()> {
    let written = match command {
        TlsCommand::Ca(args) => make_ca(args)?,
        TlsCommand::Cert(args) => issue(args)?,
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "certificate": written.0.display().to_string(),
                "key": written.1.display().to_string(),
            })
        );
    } else {
        println!("certificate: {}", written.0.display());
        println!("key:         {}", written.1.display());
    }
    Ok(())
}

fn validity(params: &mut CertificateParams, days: u64) -> Result<()> {
    if !(1..=DAYS_MAX).contains(&days) {
        bail!("--days must be 1..={DAYS_MAX}");
    }
    let now = SystemTime::now();
    // A little slack for clocks behind this one.
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(days * 86_400)).into();
    Ok(())
}

fn make_ca(args: &CaArgs) -> Result<(PathBuf, PathBuf)> {
    let (cert_path, key_path) = (args.dir.join("ca.pem"), args.dir.join("ca-key.pem"));
    if !args.force && (cert_path.exists() || key_path.exists()) {
        bail!(
            "{} already holds a CA (--force replaces it)",
            args.dir.display()
        );
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, args.name.as_str());
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, args.days)?;
    let key = KeyPair::generate()?;
    let certificate = params.self_signed(&key)?;
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    write(&cert_path, &certificate.pem(), false)?;
    write(&key_path, &key.serialize_pem(), true)?;
    Ok((cert_path, key_path))
}

fn issue(args: &CertArgs) -> Result<(PathBuf, PathBuf)> {
    let name_ok = !args.name.is_empty()
        && args.name.len() <= 64
        && args
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && args.name != "ca";
    if !name_ok {
        bail!("--name must be 1 to 64 letters, digits, '-', '_' or '.', and not \"ca\"");
    }
    if args.hosts.len() > HOSTS_MAX {
        bail!("at most {HOSTS_MAX} --host");
    }
    for host in &args.hosts {
        let dns_name = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b));
        if host.parse::<std::net::IpAddr>().is_err() && !dns_name {
            bail!("--host {host:?} is not a DNS name or an IP address");
        }
    }
    let ca_pem = read(&args.dir.join("ca.pem"))?;
    let ca_key = KeyPair::from_pem(&read(&args.dir.join("ca-key.pem"))?)
        .context("ca-key.pem is not a PEM private key")?;
    let ca = CertificateParams::from_ca_cert_pem(&ca_pem)
        .context("ca.pem is not a PEM CA certificate")?
        .self_signed(&ca_key)?;

    let mut params = CertificateParams::new(args.hosts.clone())
        .context("a --host is not a DNS name or an IP address")?;
    params
        .distinguished_name
        .push(DnType::CommonName, args.name.as_str());
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // A node's certificate serves its ports and is its client certificate
    // towards its peers; a client's is for client use only.
    params.extended_key_usages = if args.client {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    };
    validity(&mut params, args.days)?;
    let key = KeyPair::generate()?;
    let certificate = params.signed_by(&key, &ca, &ca_key)?;
    let cert_path = args.dir.join(format!("{}.pem", args.name));
    let key_path = args.dir.join(format!("{}-key.pem", args.name));
    write(&cert_path, &certificate.pem(), false)?;
    write(&key_path, &key.serialize_pem(), true)?;
    Ok((cert_path, key_path))
}

/// Largest CA file read.
const FILE_BYTES_MAX: u64 = 1 << 20;

fn read(path: &Path) -> Result<String> {
    crate::files::read_text_bounded(path, FILE_BYTES_MAX)
        .context("make a CA first: quiverctl tls ca")
}

fn write(path: &Path, contents: &str, secret: bool) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_issues_certificates_and_refuses_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaArgs {
            dir: dir.path().to_path_buf(),
            name: "test CA".into(),
            days: 1,
            force: false,
        };
        make_ca(&ca).unwrap();
        assert!(make_ca(&ca).is_err(), "a second CA needs --force");
        let cert = |name: &str, hosts: &[&str]| {
            issue(&CertArgs {
                dir: dir.path().to_path_buf(),
                name: name.into(),
                hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
                days: 1,
                client: hosts.is_empty(),
            })
        };
        let (pem, key) = cert("node1", &["127.0.0.1", "localhost"]).unwrap();
        assert!(
            read(&pem)
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        for bad in ["", "../x", "ca", "a b"] {
            assert!(cert(bad, &[]).is_err(), "{bad:?}");
        }
        assert!(cert("x", &["not a host"]).is_err());
        assert!(cert("x", &["*.quiver"]).is_err(), "no wildcards");
    }
}
