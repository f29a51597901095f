//! Snapshots: a RocksDB checkpoint of a replica's store (hard links) plus a
//! manifest of its files with their sizes and crc32, built from the live
//! store, streamed file by file to a lagging follower, checked there and
//! installed by opening a new `db-<generation>` and swapping it in.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quiver_engine::StateStore;
use quiver_engine::durable::{StagingDir, sync_dir, write_atomic};
use serde::{Deserialize, Serialize};

use super::{
    APPLIED_KEY, MANIFEST_FILE, MANIFEST_VERSION, SNAPSHOTS_DIR, StateMachine, db_path,
    decode_applied, encode_applied, engine_io, invalid, read_leader_time, read_log_holds, read_map,
    read_range, write_current,
};
use crate::types::{GroupId, SnapshotMeta};

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFile {
    /// Path relative to the snapshot's `db/` directory.
    pub name: String,
    /// Size.
    pub bytes: u64,
    /// crc32 of the content.
    pub crc32: u32,
}

/// The manifest of a snapshot: what it covers and the files it is made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// The group.
    pub group: GroupId,
    /// A unique id (term-index-time).
    pub snapshot_id: String,
    /// Last applied log id and membership in the snapshot.
    pub meta: SnapshotMeta,
    /// The checkpoint's files.
    pub files: Vec<SnapshotFile>,
}

impl Manifest {
    /// Decodes a manifest (from disk; bytes that may be anything) and checks
    /// its version and that every file name is one plain path component.
    pub fn decode(bytes: &[u8]) -> io::Result<Manifest> {
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| invalid(format!("snapshot manifest: {e}")))?;
        if manifest.version != MANIFEST_VERSION {
            return Err(invalid(format!(
                "snapshot manifest version {} is not {MANIFEST_VERSION}",
                manifest.version
            )));
        }
        for file in &manifest.files {
            checked_name(&file.name)?;
        }
        Ok(manifest)
    }

    /// Total bytes of the snapshot's files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// A snapshot on disk: a directory with `db/` and `manifest.json`.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    /// The directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Shared by every copy of this handle (the state machine's current
    /// snapshot, a sender streaming it to a follower): once the snapshot is
    /// replaced by a newer one, its directory goes with the last copy, not
    /// while a transfer still reads it.
    lifetime: Arc<SnapshotLifetime>,
}

/// Removes a retired snapshot's directory when the last handle goes.
#[derive(Debug)]
struct SnapshotLifetime {
    dir: PathBuf,
    retired: std::sync::atomic::AtomicBool,
}

impl Drop for SnapshotLifetime {
    fn drop(&mut self) {
        if self.retired.load(std::sync::atomic::Ordering::SeqCst)
            && let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove an old snapshot");
        }
    }
}

impl SnapshotDir {
    /// A handle on the snapshot in `dir`.
    pub fn new(dir: PathBuf, manifest: Manifest) -> Self {
        Self {
            lifetime: Arc::new(SnapshotLifetime {
                dir: dir.clone(),
                retired: std::sync::atomic::AtomicBool::new(false),
            }),
            dir,
            manifest,
        }
    }

    /// Marks the snapshot for removal once no handle on it is left.
    fn retire(&self) {
        self.lifetime
            .retired
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The checkpoint directory.
    pub fn db_dir(&self) -> PathBuf {
        self.dir.join("db")
    }

    /// Loads a snapshot directory and checks every file against the
    /// manifest (size and crc32).
    pub fn load_verified(dir: &Path) -> io::Result<SnapshotDir> {
        let manifest = Manifest::decode(&std::fs::read(dir.join(MANIFEST_FILE))?)
            .map_err(|e| invalid(format!("{}: {e}", dir.display())))?;
        let snapshot = SnapshotDir::new(dir.to_path_buf(), manifest);
        for file in &snapshot.manifest.files {
            let path = snapshot.db_dir().join(checked_name(&file.name)?);
            if file_size_and_crc(&path)? != (file.bytes, file.crc32) {
                return Err(invalid(format!(
                    "snapshot file {} does not match its manifest",
                    path.display()
                )));
            }
        }
        Ok(snapshot)
    }
}

/// A file name from a manifest (maybe from the network): one plain path
/// component, so it cannot escape the snapshot directory.
pub fn checked_name(name: &str) -> io::Result<&str> {
    let plain = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if plain {
        Ok(name)
    } else {
        Err(invalid(format!("bad snapshot file name {name:?}")))
    }
}

impl StateMachine {
    pub(super) fn build(&self) -> io::Result<SnapshotDir> {
        let _no_swap = self.shared.swap.read();
        let store = self.store();
        let snapshots = self.shared.dir.join(SNAPSHOTS_DIR);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // Removed if anything below fails; kept once renamed into place.
        let staging = StagingDir::create(snapshots.join(format!("building-{nanos}")))?;
        let applied_bytes = store
            .checkpoint_with_meta(&staging.path().join("db"), APPLIED_KEY)
            .map_err(engine_io)?;
        let (last_log_id, membership) = decode_applied(applied_bytes.as_deref())?;
        let snapshot_id = match last_log_id {
            Some(id) => format!("{}-{}-{nanos}", id.leader_id.term, id.index),
            None => format!("empty-{nanos}"),
        };
        let files = describe_files(&staging.path().join("db"))?;
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            group: self.shared.group,
            snapshot_id: snapshot_id.clone(),
            meta: SnapshotMeta {
                last_log_id,
                last_membership: membership,
            },
            files,
        };
        write_manifest(staging.path(), &manifest)?;
        let final_dir = snapshots.join(&snapshot_id);
        std::fs::rename(staging.path(), &final_dir)?;
        staging.keep();
        sync_dir(&snapshots)?;
        let snapshot = SnapshotDir::new(final_dir, manifest);
        self.replace_current_snapshot(snapshot.clone());
        tracing::info!(group = self.shared.group, id = %snapshot_id, bytes = snapshot.manifest.bytes(), "snapshot built");
        Ok(snapshot)
    }

    /// Makes `snapshot` the current one and deletes the older ones.
    pub(super) fn replace_current_snapshot(&self, snapshot: SnapshotDir) {
        let mut current = self.shared.snapshot.lock();
        let newer = current
            .as_ref()
            .is_none_or(|c| c.manifest.meta.last_log_id <= snapshot.manifest.meta.last_log_id);
        if !newer {
            snapshot.retire();
            return;
        }
        if let Some(old) = current.replace(snapshot)
            && current.as_ref().is_some_and(|c| c.dir != old.dir)
        {
            // Removed when the last transfer reading it is done.
            old.retire();
        }
    }

    pub(super) fn install(&self, meta: &SnapshotMeta, snapshot: SnapshotDir) -> io::Result<()> {
        // Keep our own copy (hard links) as the current snapshot: it serves
        // the next lagging follower and survives the sender's cleanup.
        let snapshots = self.shared.dir.join(SNAPSHOTS_DIR);
        let own_dir = snapshots.join(&snapshot.manifest.snapshot_id);
        if own_dir != snapshot.dir {
            let _ = std::fs::remove_dir_all(&own_dir);
            let staging = StagingDir::create(
                snapshots.join(format!("installing-{}", snapshot.manifest.snapshot_id)),
            )?;
            let staged_db = staging.path().join("db");
            std::fs::create_dir_all(&staged_db)?;
            for file in &snapshot.manifest.files {
                let name = checked_name(&file.name)?;
                link_or_copy(&snapshot.db_dir().join(name), &staged_db.join(name))?;
            }
            write_manifest(staging.path(), &snapshot.manifest)?;
            std::fs::rename(staging.path(), &own_dir)?;
            staging.keep();
            sync_dir(&snapshots)?;
        }
        let own = SnapshotDir::new(
            own_dir,
            Manifest {
                meta: meta.clone(),
                ..snapshot.manifest.clone()
            },
        );

        // A new live db from the snapshot: table files are immutable, so
        // hard links do; the rest RocksDB rewrites in place, so copy.
        let next_generation = *self.shared.generation.lock() + 1;
        let next_db = db_path(&self.shared.dir, next_generation);
        let _ = std::fs::remove_dir_all(&next_db);
        std::fs::create_dir_all(&next_db)?;
        for file in &own.manifest.files {
            let name = checked_name(&file.name)?;
            let from = own.db_dir().join(name);
            let to = next_db.join(name);
            if name.ends_with(".sst") {
                link_or_copy(&from, &to)?;
            } else {
                std::fs::copy(&from, &to)?;
                // CURRENT_DB will point here and the log gets purged: every
                // byte must be on disk first.
                std::fs::File::open(&to)?.sync_all()?;
            }
        }
        sync_dir(&next_db)?;
        let store = StateStore::open(&next_db, self.shared.options.clone()).map_err(engine_io)?;
        let leader_time_us = read_leader_time(&store)?;
        let map = read_map(&store)?;
        let range = read_range(&store)?;
        let log_holds = read_log_holds(&store)?;
        // The checkpoint holds the applied position its data corresponds to;
        // record what openraft installed, in case they differ in form.
        let meta_bytes = encode_applied(&meta.last_log_id, &meta.last_membership)?;
        store
            .put_meta(&[(APPLIED_KEY, Some(meta_bytes.as_slice()))])
            .map_err(engine_io)?;
        let _exclusive = self.shared.swap.write();
        write_current(&self.shared.dir, next_generation)?;
        let old_generation = {
            let mut generation = self.shared.generation.lock();
            std::mem::replace(&mut *generation, next_generation)
        };
        // The range first (see `split`): a reader that finds the new
        // store's rows also finds the new range version.
        *self.shared.range.lock() = range;
        self.shared.store.store(Arc::new(store));
        {
            let mut applied = self.shared.applied.lock();
            *applied = (meta.last_log_id, meta.last_membership.clone());
            // The snapshot's, not the max with ours: an install replaces
            // the state, and the time is part of it.
            self.shared
                .leader_time_us
                .store(leader_time_us, std::sync::atomic::Ordering::SeqCst);
        }
        self.shared.map.send_replace(map);
        *self.shared.log_holds.lock() = log_holds;
        self.shared.observer.store_replaced();
        self.replace_current_snapshot(own);
        // Readers may still hold the old store for a moment; RocksDB keeps
        // its open files readable after the unlink.
        let _ = std::fs::remove_dir_all(db_path(&self.shared.dir, old_generation));
        tracing::info!(
            group = self.shared.group,
            last_log_id = ?meta.last_log_id,
            "snapshot installed"
        );
        Ok(())
    }
}

/// The newest complete snapshot in `dir` (complete = its manifest exists and
/// parses; the receiver of a sent snapshot checks every file against it).
pub(super) fn latest_snapshot(dir: &Path) -> Option<SnapshotDir> {
    let mut best: Option<SnapshotDir> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(bytes) = std::fs::read(entry.path().join(MANIFEST_FILE)) else {
            continue;
        };
        let Ok(manifest) = Manifest::decode(&bytes) else {
            continue;
        };
        let candidate = SnapshotDir::new(entry.path(), manifest);
        if best
            .as_ref()
            .is_none_or(|b| b.manifest.meta.last_log_id < candidate.manifest.meta.last_log_id)
        {
            best = Some(candidate);
        }
    }
    best
}

/// Size and crc32 of a file, read in 1 MiB pieces: table files can be far
/// larger than what a snapshot should hold in memory.
fn file_size_and_crc(path: &Path) -> io::Result<(u64, u32)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok((bytes, hasher.finalize()));
        }
        hasher.update(&buffer[..n]);
        bytes += n as u64;
    }
}

fn describe_files(db_dir: &Path) -> io::Result<Vec<SnapshotFile>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(db_dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let (bytes, crc32) = file_size_and_crc(&entry.path())?;
        files.push(SnapshotFile { name, bytes, crc32 });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Writes `manifest.json` durably (it marks the snapshot complete).
pub fn write_manifest(dir: &Path, manifest: &Manifest) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(manifest).map_err(io::Error::other)?;
    write_atomic(&dir.join(MANIFEST_FILE), &bytes)
}

fn link_or_copy(from: &Path, to: &Path) -> io::Result<()> {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to)?;
        std::fs::File::open(to)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn manifest_json() -> Vec<u8> {
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            group: 3,
            snapshot_id: "1-20-17000".into(),
            meta: SnapshotMeta::default(),
            files: vec![
                SnapshotFile {
                    name: "000012.sst".into(),
                    bytes: 4096,
                    crc32: 7,
                },
                SnapshotFile {
                    name: "MANIFEST-000005".into(),
                    bytes: 300,
                    crc32: 9,
                },
            ],
        };
        serde_json::to_vec(&manifest).unwrap()
    }

    #[test]
    fn a_manifest_decodes_and_escaping_names_or_other_versions_are_refused() {
        let json = manifest_json();
        assert_eq!(Manifest::decode(&json).unwrap().files.len(), 2);
        let text = String::from_utf8(json).unwrap();
        for broken in [
            text.replace("000012.sst", "../../etc/passwd"),
            text.replace("000012.sst", ""),
            text.replace("\"version\":1", "\"version\":2"),
        ] {
            assert_ne!(broken, text);
            assert!(Manifest::decode(broken.as_bytes()).is_err(), "{broken}");
        }
    }

    proptest! {
        /// A manifest read from disk may be anything (torn, corrupt): a
        /// typed error or a manifest whose every file name is plain.
        #[test]
        fn arbitrary_bytes_never_panic_the_manifest_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..600)
        ) {
            if let Ok(manifest) = Manifest::decode(&bytes) {
                prop_assert!(manifest.files.iter().all(|f| checked_name(&f.name).is_ok()));
            }
        }

        #[test]
        fn mutated_manifests_never_panic_the_decoder(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            let mut bytes = manifest_json();
            for (at, value) in flips {
                let len = bytes.len();
                bytes[at % len] = value;
            }
            let keep = cut % (bytes.len() + 1);
            for candidate in [&bytes[..], &bytes[..keep]] {
                if let Ok(manifest) = Manifest::decode(candidate) {
                    prop_assert!(manifest.files.iter().all(|f| checked_name(&f.name).is_ok()));
                }
            }
        }
    }
}
