//! Where backups go: an object store reached through the `object_store`
//! crate, named by URL. `file:///absolute/dir` (a local or mounted
//! directory, created if missing) always; `s3://bucket/prefix` when built
//! with the `s3` feature (credentials and endpoint from the `AWS_*`
//! environment).
//!
//! Layout under the target:
//!
//! ```text
//! backups/<id>/shards/<group>/<file>   one shard's checkpoint files
//! backups/<id>/MANIFEST.json           written last, never overwritten
//! log/<cluster id>/g<group>/...        shipped change streams (see `log`)
//! ```
//!
//! A backup without its manifest is incomplete (a crash, a failed shard)
//! and is never listed or restored.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload, WriteMultipart};
use quiver_raft::backup::FileHasher;

use super::{BackupError, blocking, io_error};
use crate::cluster::throttle::ByteRate;
use crate::config::BackupConfig;

/// Longest target URL accepted.
pub const BACKUP_URL_BYTES_MAX: usize = 2048;
/// Bytes read from disk and uploaded as one part.
const UPLOAD_PART_BYTES: usize = 8 << 20;
/// Parts of one file in flight to the target at once.
const UPLOAD_PARTS_IN_FLIGHT_MAX: usize = 2;
/// Bytes hashed per hop to a blocking thread when re-reading an object.
const HASH_PART_BYTES: usize = 1 << 20;

/// An opened backup target.
#[derive(Clone)]
pub struct Target {
    url: String,
    store: Arc<dyn ObjectStore>,
    /// The directory of a `file://` target (whose emptied directories a
    /// delete removes: a file system keeps them, an object store has none).
    local: Option<PathBuf>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("url", &self.url).finish()
    }
}

fn bad_url(url: &str, reason: impl Into<String>) -> BackupError {
    BackupError::Target {
        url: url.chars().take(200).collect(),
        reason: reason.into(),
    }
}

impl Target {
    /// Opens the target `url` for a node whose data lives in `data_dir`:
    /// a `file://` directory must be absolute, outside the data directory
    /// and under one of `config.file_roots` if any are set; it is used as
    /// resolved now (symlinks followed once, here), and created if missing
    /// only with `create` (reading a target never makes one).
    pub fn open(
        url: &str,
        config: &BackupConfig,
        data_dir: &Path,
        create: bool,
    ) -> Result<Target, BackupError> {
        if url.len() > BACKUP_URL_BYTES_MAX {
            return Err(bad_url(
                url,
                format!("longer than {BACKUP_URL_BYTES_MAX} bytes"),
            ));
        }
        if let Some(path) = url.strip_prefix("file://") {
            let dir = checked_dir(url, path, config, data_dir)?;
            if create {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| bad_url(url, format!("cannot create {}: {e}", dir.display())))?;
            } else if !dir.is_dir() {
                return Err(bad_url(
                    url,
                    format!("{} is not a directory", dir.display()),
                ));
            }
            let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| bad_url(url, e.to_string()))?;
            return Ok(Target {
                url: url.to_owned(),
                store: Arc::new(store),
                local: Some(dir),
            });
        }
        if url.starts_with("s3://") {
            return open_s3(url);
        }
        Err(bad_url(
            url,
            "the scheme must be file:// (or s3:// in a build with the `s3` feature)",
        ))
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Uploads the file at `path` to `key`, reading it in parts on blocking
    /// threads at `rate`, and returns its size, crc32c and sha256 as read.
    pub async fn put_file(
        &self,
        key: &str,
        path: &Path,
        rate: Option<&ByteRate>,
    ) -> Result<(u64, u32, String), BackupError> {
        let location = object_path(key)?;
        let file = std::fs::File::open(path).map_err(|e| io_error(path, e))?;
        // The file and the hasher go to a blocking thread and back with
        // each part: hashing is CPU (a part's sha256 takes a dev build
        // hundreds of ms), which must never stall the async workers that
        // serve requests.
        let mut state = Some((file, FileHasher::default()));
        let upload = self.store.put_multipart(&location).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, UPLOAD_PART_BYTES);
        let mut hasher = None;
        loop {
            let Some((reading, part_hasher)) = state.take() else {
                break;
            };
            let read_path = path.to_path_buf();
            let (reading, chunk, part_hasher) = blocking(path, move || {
                use std::io::Read;
                let (mut reading, mut part_hasher) = (reading, part_hasher);
                let mut chunk = vec![0u8; UPLOAD_PART_BYTES];
                let mut filled = 0;
                while filled < chunk.len() {
                    match reading.read(&mut chunk[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(io_error(&read_path, e)),
                    }
                }
                chunk.truncate(filled);
                part_hasher.update(&chunk);
                Ok((reading, chunk, part_hasher))
            })
            .await?;
            if chunk.is_empty() {
                hasher = Some(part_hasher);
                break;
            }
            if let Some(rate) = rate {
                let wait = rate.reserve(chunk.len() as u64, std::time::Instant::now());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            writer.wait_for_capacity(UPLOAD_PARTS_IN_FLIGHT_MAX).await?;
            writer.write(&chunk);
            state = Some((reading, part_hasher));
        }
        writer.finish().await?;
        Ok(hasher.unwrap_or_default().finish())
    }

    /// Writes `bytes` to `key` only if nothing is there (a manifest is
    /// written once: a second backup with the same id fails).
    pub async fn put_new(&self, key: &str, bytes: Vec<u8>) -> Result<(), BackupError> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        self.store
            .put_opts(&object_path(key)?, PutPayload::from(bytes), options)
            .await?;
        Ok(())
    }

    /// Writes `bytes` to `key`, replacing what is there (a pointer such as
    /// a shipped log's `LATEST`; never a manifest or a chunk).
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), BackupError> {
        self.store
            .put(&object_path(key)?, PutPayload::from(bytes))
            .await?;
        Ok(())
    }

    /// The names of the files directly under `prefix` (not in its
    /// subdirectories), those after the name `after` only if given, at most
    /// `names_max` of them (more is an error: a listing that big is not a
    /// target this build wrote).
    pub async fn list_files(
        &self,
        prefix: &str,
        after: Option<&str>,
        names_max: usize,
    ) -> Result<Vec<String>, BackupError> {
        let location = object_path(prefix)?;
        let mut listed = match after {
            Some(after) => self
                .store
                .list_with_offset(Some(&location), &object_path(&format!("{prefix}/{after}"))?),
            None => self.store.list(Some(&location)),
        };
        let mut names = Vec::new();
        while let Some(meta) = listed.next().await {
            let meta = meta?;
            // Only direct children: `prefix/name`.
            let mut parts = meta.location.prefix_match(&location).into_iter().flatten();
            let (Some(name), None) = (parts.next(), parts.next()) else {
                continue;
            };
            if names.len() >= names_max {
                return Err(BackupError::Corrupt {
                    what: prefix.to_owned(),
                    reason: format!("more than {names_max} files"),
                });
            }
            names.push(name.as_ref().to_owned());
        }
        Ok(names)
    }

    /// Every object under `prefix`, at any depth, as its key; at most
    /// `keys_max`.
    pub async fn list_all(
        &self,
        prefix: &str,
        keys_max: usize,
    ) -> Result<Vec<String>, BackupError> {
        let mut listed = self.store.list(Some(&object_path(prefix)?));
        let mut keys = Vec::new();
        while let Some(meta) = listed.next().await {
            if keys.len() >= keys_max {
                return Err(BackupError::Corrupt {
                    what: prefix.to_owned(),
                    reason: format!("more than {keys_max} objects"),
                });
            }
            keys.push(meta?.location.to_string());
        }
        Ok(keys)
    }

    /// Deletes every object under `prefix`, and in a `file://` target the
    /// directories that leaves empty.
    pub async fn delete_all(&self, prefix: &str, keys_max: usize) -> Result<(), BackupError> {
        for key in self.list_all(prefix, keys_max).await? {
            self.delete(&key).await?;
        }
        if let Some(root) = &self.local {
            let dir = root.join(prefix);
            blocking(&dir.clone(), move || {
                remove_empty_dirs(&dir);
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    /// Deletes the object at `key` (gone already is fine).
    pub async fn delete(&self, key: &str) -> Result<(), BackupError> {
        match self.store.delete(&object_path(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads `key` whole, refusing more than `bytes_max`; `None` if absent.
    pub async fn get(&self, key: &str, bytes_max: u64) -> Result<Option<Vec<u8>>, BackupError> {
        let location = object_path(key)?;
        let result = match self.store.get(&location).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if result.meta.size > bytes_max {
            return Err(BackupError::Corrupt {
                what: key.to_owned(),
                reason: format!("{} bytes, more than {bytes_max}", result.meta.size),
            });
        }
        Ok(Some(result.bytes().await?.to_vec()))
    }

    /// The size, crc32c and sha256 of the object at `key`, read through
    /// (`Ok(None)`: it is missing).
    pub async fn hash(&self, key: &str) -> Result<Option<(u64, u32, String)>, BackupError> {
        let location = object_path(key)?;
        let result = match self.store.get(&location).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut hasher = FileHasher::default();
        let mut stream = result.into_stream();
        let mut pending = Vec::new();
        loop {
            let chunk = stream.next().await.transpose()?;
            if let Some(chunk) = &chunk {
                pending.extend_from_slice(chunk);
            }
            // Off the async workers, as in put_file, a part at a time (a
            // local file streams in 8 KiB pieces: one hop each would cost
            // more than the hashing).
            if pending.len() >= HASH_PART_BYTES || (chunk.is_none() && !pending.is_empty()) {
                let part = std::mem::take(&mut pending);
                hasher = tokio::task::spawn_blocking(move || {
                    hasher.update(&part);
                    hasher
                })
                .await
                .map_err(|e| io_error(Path::new(key), std::io::Error::other(e)))?;
            }
            if chunk.is_none() {
                break;
            }
        }
        Ok(Some(hasher.finish()))
    }

    /// Copies the object at `key` into the local file `path`, refusing
    /// more than `bytes_max` (what the manifest recorded: a grown object
    /// cannot fill the disk before a checksum catches it).
    pub async fn download(
        &self,
        key: &str,
        path: &Path,
        bytes_max: u64,
    ) -> Result<(), BackupError> {
        let location = object_path(key)?;
        let result = match self.store.get(&location).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(BackupError::Corrupt {
                    what: key.to_owned(),
                    reason: "missing".into(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        if result.meta.size > bytes_max {
            return Err(BackupError::Corrupt {
                what: key.to_owned(),
                reason: format!("{} bytes, the manifest says {bytes_max}", result.meta.size),
            });
        }
        let mut stream = result.into_stream();
        let mut out = Vec::new();
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            total += chunk.len() as u64;
            if total > bytes_max {
                return Err(BackupError::Corrupt {
                    what: key.to_owned(),
                    reason: format!("more than the {bytes_max} bytes the manifest says"),
                });
            }
            out.extend_from_slice(&chunk);
            if out.len() >= UPLOAD_PART_BYTES {
                append(path, std::mem::take(&mut out)).await?;
            }
        }
        append(path, out).await
    }

    /// The names directly under `prefix` that are "directories".
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, BackupError> {
        let listed = self
            .store
            .list_with_delimiter(Some(&object_path(prefix)?))
            .await?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect())
    }
}

/// Removes `dir` and the directories under it if they hold no file.
fn remove_empty_dirs(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&entry.path());
            }
        }
    }
    // Fails, as it should, if anything is left.
    let _ = std::fs::remove_dir(dir);
}

/// Appends `bytes` to the file at `path` (created if missing).
async fn append(path: &Path, bytes: Vec<u8>) -> Result<(), BackupError> {
    let owned = path.to_path_buf();
    blocking(path, move || {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&owned)
            .and_then(|mut file| file.write_all(&bytes))
            .map_err(|e| io_error(&owned, e))
    })
    .await
}

/// An object path from our own key (plain segments only).
fn object_path(key: &str) -> Result<ObjectPath, BackupError> {
    ObjectPath::parse(key).map_err(|e| BackupError::Corrupt {
        what: key.to_owned(),
        reason: e.to_string(),
    })
}

/// The directory of a `file://` URL, checked against the node's rules.
fn checked_dir(
    url: &str,
    path: &str,
    config: &BackupConfig,
    data_dir: &Path,
) -> Result<PathBuf, BackupError> {
    let dir = PathBuf::from(path);
    if !dir.is_absolute() {
        return Err(bad_url(
            url,
            "a file:// target needs an absolute path (file:///dir)",
        ));
    }
    if dir
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(bad_url(url, "'..' is not allowed in a target path"));
    }
    let data_dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    // The deepest existing ancestor, resolved (symlinks), decides where
    // the target really is.
    let resolved = resolve(&dir);
    if resolved.starts_with(&data_dir) || data_dir.starts_with(&resolved) {
        return Err(bad_url(
            url,
            format!(
                "a backup target must not hold or be inside the node's data directory {}",
                data_dir.display()
            ),
        ));
    }
    if !config.file_roots.is_empty()
        && !config
            .file_roots
            .iter()
            .any(|root| resolved.starts_with(resolve(root)))
    {
        return Err(bad_url(
            url,
            format!(
                "not under backup.file_roots ({})",
                config
                    .file_roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok(resolved)
}

/// `path` with its deepest existing ancestor canonicalized.
fn resolve(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_owned());
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
    let mut resolved = std::fs::canonicalize(&existing).unwrap_or(existing);
    for name in rest.into_iter().rev() {
        resolved.push(name);
    }
    resolved
}

#[cfg(feature = "s3")]
fn open_s3(url: &str) -> Result<Target, BackupError> {
    let store = object_store::aws::AmazonS3Builder::from_env()
        .with_url(url)
        .build()
        .map_err(|e| bad_url(url, e.to_string()))?;
    // The builder takes only the bucket from the URL: the path is ours to
    // apply, or every target in a bucket would share one namespace.
    let prefix = url
        .trim_start_matches("s3://")
        .split_once('/')
        .map_or("", |(_, prefix)| prefix.trim_matches('/'));
    let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
        Arc::new(store)
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
    };
    Ok(Target {
        local: None,
        url: url.to_owned(),
        store,
    })
}

#[cfg(not(feature = "s3"))]
fn open_s3(url: &str) -> Result<Target, BackupError> {
    Err(bad_url(
        url,
        "this quiverd was built without S3 support (cargo feature `s3`)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_before_anything_is_written() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let config = BackupConfig::default();
        let open = |url: &str, config: &BackupConfig| Target::open(url, config, &data, true);
        for bad in [
            "backups".to_owned(),
            "file://relative/dir".to_owned(),
            "ftp://host/x".to_owned(),
            "s3://bucket/x".to_owned(),
            format!("file://{}", data.join("inside").display()),
            format!("file://{}", root.path().display()),
            format!("file://{}/a/../b", root.path().display()),
            format!("file:///{}", "x".repeat(BACKUP_URL_BYTES_MAX)),
        ] {
            if cfg!(feature = "s3") && bad.starts_with("s3://") {
                continue;
            }
            let err = open(&bad, &config).unwrap_err();
            assert!(matches!(err, BackupError::Target { .. }), "{bad}: {err}");
        }
        let fine = root.path().join("backups");
        let url = format!("file://{}", fine.display());
        assert!(
            Target::open(&url, &config, &data, false).is_err(),
            "reading never creates"
        );
        open(&url, &config).unwrap();
        assert!(fine.is_dir(), "created");
        Target::open(&url, &config, &data, false).unwrap();
        let restricted = BackupConfig {
            file_roots: vec![root.path().join("allowed")],
            ..BackupConfig::default()
        };
        assert!(open(&format!("file://{}", fine.display()), &restricted).is_err());
        open(
            &format!("file://{}", root.path().join("allowed/b").display()),
            &restricted,
        )
        .unwrap();
    }

    #[tokio::test]
    async fn files_go_up_whole_manifests_once_and_come_back_hashed() {
        let root = tempfile::tempdir().unwrap();
        let target = Target::open(
            &format!("file://{}", root.path().join("t").display()),
            &BackupConfig::default(),
            &root.path().join("data"),
            true,
        )
        .unwrap();
        let source = root.path().join("source");
        let bytes: Vec<u8> = (0..(UPLOAD_PART_BYTES * 2 + 17))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&source, &bytes).unwrap();
        let uploaded = target
            .put_file("backups/a/shards/1/000007.sst", &source, None)
            .await
            .unwrap();
        assert_eq!(uploaded.0, bytes.len() as u64);
        let hashed = target
            .hash("backups/a/shards/1/000007.sst")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(hashed, uploaded);
        assert_eq!(target.hash("backups/a/nothing").await.unwrap(), None);
        let copy = root.path().join("copy");
        target
            .download("backups/a/shards/1/000007.sst", &copy, u64::MAX)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), bytes);

        target
            .put_new("backups/a/MANIFEST.json", b"{}".to_vec())
            .await
            .unwrap();
        assert!(
            target
                .put_new("backups/a/MANIFEST.json", b"{}".to_vec())
                .await
                .is_err(),
            "written once"
        );
        assert_eq!(target.list_dirs("backups").await.unwrap(), vec!["a"]);
        assert_eq!(
            target.get("backups/a/MANIFEST.json", 2).await.unwrap(),
            Some(b"{}".to_vec())
        );
        assert!(target.get("backups/a/MANIFEST.json", 1).await.is_err());
        assert_eq!(
            target.get("backups/b/MANIFEST.json", 9).await.unwrap(),
            None
        );
    }
}
