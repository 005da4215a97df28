//! Writing output files so that a failure never leaves a partial file behind.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Writes `path` through `write`: into a hidden temporary file in the same directory, flushed and
/// then renamed over `path`. On any error the temporary file is removed and `path` is untouched.
/// The parent directory must exist (it is not created: a typo in `--out` should not make folders).
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::result::Result<(), String>,
) -> Result<()> {
    let err = |message: String| Error::Io { path: path.to_path_buf(), message };
    let file_name = path.file_name().ok_or_else(|| err("is not a file path".into()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(err(format!("directory {} does not exist; create it first", dir.display())));
    }
    // Unique per process and call, and created exclusively, so concurrent writers never share one.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let serial = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.tmp-{}-{serial}", file_name.to_string_lossy(), std::process::id()));
    let file = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| err(e.to_string()))?;
    let result = (|| {
        let mut writer = BufWriter::new(file);
        write(&mut writer)?;
        writer.flush().map_err(|e| e.to_string())?;
        writer.get_ref().sync_all().map_err(|e| e.to_string())?;
        drop(writer);
        std::fs::rename(&tmp, path).map_err(|e| e.to_string())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_leaves_nothing_behind() {
        let dir = std::env::temp_dir().join(format!("t2i-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("out.bin");
        std::fs::write(&target, b"old").unwrap();
        let result = write_atomically(&target, |w| {
            w.write_all(b"partial").map_err(|e| e.to_string())?;
            Err("encoder failed".into())
        });
        assert!(result.unwrap_err().to_string().contains("encoder failed"));
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "temporary file left behind");
        write_atomically(&target, |w| w.write_all(b"new").map_err(|e| e.to_string())).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert!(write_atomically(&dir.join("missing/out.bin"), |_| Ok(()))
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
