//! The one home for crash-safe small files and staging directories.
//!
//! A small file (a vote, a purge point, the name of the live store, a
//! snapshot manifest) is replaced atomically and durably: written to a
//! temporary file, fsynced, renamed over the old one, and the directory
//! fsynced so the rename itself survives a power loss. A reader then sees the
//! old bytes or the new ones, never a mix.
//!
//! A staging directory is removed when its guard is dropped unless it was
//! kept: an early `?` between creating it and finishing with it cannot leak
//! it.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// fsyncs a directory, so the entries created, renamed or removed in it
/// survive a power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `bytes` atomically and durably (see the module doc).
/// The temporary file is `path` with `.tmp` appended to its name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let temporary = path.with_file_name(name);
    {
        let mut file = File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => sync_dir(Path::new(".")),
    }
}

/// A directory being filled (a snapshot arriving, a checkpoint being
/// built): removed when the guard is dropped, unless [`StagingDir::keep`]
/// was called.
#[derive(Debug)]
pub struct StagingDir {
    path: PathBuf,
    kept: bool,
}

impl StagingDir {
    /// Creates `path` (and its parents) empty, removing what was there (a
    /// leftover of a crash).
    pub fn create(path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(&path)?;
        Ok(Self { path, kept: false })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory (it was renamed into place, or is handed over)
    /// and returns its path.
    pub fn keep(mut self) -> PathBuf {
        self.kept = true;
        std::mem::take(&mut self.path)
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.kept
            && let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.path.display(), error = %e, "cannot remove a staging directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vote");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("vote")]);
    }

    #[test]
    fn a_staging_dir_is_removed_on_an_early_return_and_kept_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let fails = || -> io::Result<()> {
            let staging = StagingDir::create(dir.path().join("incoming/a"))?;
            std::fs::write(staging.path().join("file"), b"x")?;
            Err(io::Error::other("the transfer broke"))
        };
        assert!(fails().is_err());
        assert!(!dir.path().join("incoming/a").exists());

        let staging = StagingDir::create(dir.path().join("incoming/b")).unwrap();
        std::fs::write(staging.path().join("file"), b"x").unwrap();
        let kept = staging.keep();
        assert!(kept.join("file").exists());

        // A leftover is cleared when staging starts again.
        let again = StagingDir::create(&kept).unwrap();
        assert_eq!(std::fs::read_dir(again.path()).unwrap().count(), 0);
    }
}
