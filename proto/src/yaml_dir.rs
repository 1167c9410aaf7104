//! The YAML directory a one-machine mesh is driven from: which files in it hold objects. Shared by
//! the control plane (its directory source) and the CLI (which edits the same files).

use std::path::{Path, PathBuf};

fn is_hidden(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

/// Every `.yaml`/`.yml` file below `dir`, hidden files and directories skipped.
pub fn list_yaml(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if is_hidden(&path) {
            continue;
        }
        if path.is_dir() {
            // A subdirectory that vanishes mid-scan is simply skipped.
            let _ = list_yaml(&path, out);
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(path);
        }
    }
    Ok(())
}
