//! Reading the files the CLI is given, bounded.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// The file at `path`, refused if larger than `bytes_max` (read through a
/// bound, so a file that grows meanwhile is refused too).
pub fn read_bounded(path: &Path, bytes_max: u64) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("read {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(bytes_max.saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(|| format!("read {}", path.display()))?;
    if bytes.len() as u64 > bytes_max {
        bail!("{} is larger than {bytes_max} bytes", path.display());
    }
    Ok(bytes)
}

/// [`read_bounded`], as UTF-8 text.
pub fn read_text_bounded(path: &Path, bytes_max: u64) -> Result<String> {
    String::from_utf8(read_bounded(path, bytes_max)?)
        .with_context(|| format!("{} is not UTF-8 text", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_past_the_bound_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(read_bounded(&path, 5).unwrap(), b"12345");
        let error = read_bounded(&path, 4).unwrap_err().to_string();
        assert!(error.contains("larger than 4 bytes"), "{error}");
        assert!(read_bounded(&dir.path().join("missing"), 5).is_err());
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(read_text_bounded(&path, 5).is_err());
    }
}
