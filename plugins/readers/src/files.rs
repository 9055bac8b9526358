//! Listing helpers shared by the readers: files of a folder picked by name, sorted by name.
//!
//! Hidden files are skipped everywhere: macOS leaves `._name` resource forks beside copied
//! data (the Decathlon archives carry them), and they are not images.

use medssl_core::prelude::*;
use std::path::{Path, PathBuf};

/// Whether `path`'s file name starts with a dot.
pub fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|name| name.starts_with('.'))
}

/// The lower-cased extension of `path`, if it has one.
pub fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
}

/// The regular, non-hidden files of `folder` that `accept` takes, sorted by file name. An
/// empty result is not an error here: callers say what they expected.
pub fn files_in(folder: &Path, accept: impl Fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(folder).with_context(|| format!("cannot list folder `{}`", folder.display()))?;
    let (mut files, mut unreadable) = (Vec::new(), Vec::new());
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list folder `{}`", folder.display()))?;
        let path = entry.path();
        if is_hidden(&path) || !accept(&path) {
            continue;
        }
        if path.is_file() {
            files.push(path);
        } else if let Some(what) = medssl_core::paths::not_a_file_or_folder(&path) {
            // A name that fits but no regular file behind it (a link loop, a FIFO): said,
            // not silently dropped.
            unreadable.push(format!("`{}` {what}", path.display()));
        }
    }
    unreadable.sort();
    ensure!(
        !files.is_empty() || unreadable.is_empty(),
        "folder `{}` holds no readable file of the expected kind: {}",
        folder.display(),
        unreadable.join("; ")
    );
    for skipped in &unreadable {
        tracing::warn!("skipping {skipped}");
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// The non-hidden subfolders of `folder`, sorted by name.
pub fn subfolders(folder: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(folder).with_context(|| format!("cannot list folder `{}`", folder.display()))?;
    let mut folders = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list folder `{}`", folder.display()))?;
        let path = entry.path();
        if path.is_dir() && !is_hidden(&path) {
            folders.push(path);
        }
    }
    folders.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(folders)
}

/// Fails unless `path` is an existing folder; `expected` says what it should hold.
pub fn ensure_folder(path: &Path, expected: &str) -> Result<()> {
    ensure!(!path.as_os_str().is_empty(), "no path given; expected {expected}");
    if let Some(what) = medssl_core::paths::not_a_file_or_folder(path) {
        bail!("`{}` {what}; expected {expected}", path.display());
    }
    ensure!(
        path.is_dir(),
        "`{}` is a file, not a folder; expected {expected}",
        path.display()
    );
    Ok(())
}
