//! What a path is when it is not what a reader wants: a missing path, a broken symbolic
//! link or a link loop, a FIFO, a device or a socket. Messages that say "does not exist"
//! of a named pipe send the user looking in the wrong place.

use std::path::Path;

/// What `path` is, in words, when it is neither a regular file nor a folder (following
/// symbolic links): `does not exist`, `is a symbolic link loop`, `is a FIFO (named pipe)`,
/// ... `None` when it is a regular file or a folder.
pub fn not_a_file_or_folder(path: &Path) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() || meta.is_dir() => None,
        Ok(meta) => {
            let kind = meta.file_type();
            Some(
                if kind.is_fifo() {
                    "is a FIFO (named pipe), not a regular file or folder"
                } else if kind.is_char_device() {
                    "is a character device, not a regular file or folder"
                } else if kind.is_block_device() {
                    "is a block device, not a regular file or folder"
                } else if kind.is_socket() {
                    "is a socket, not a regular file or folder"
                } else {
                    "is neither a regular file nor a folder"
                }
                .to_string(),
            )
        }
        Err(e) => {
            let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            // ELOOP: too many levels of symbolic links.
            Some(if e.raw_os_error() == Some(libc_eloop()) {
                "is a symbolic link loop (too many levels of symbolic links)".to_string()
            } else if link && e.kind() == std::io::ErrorKind::NotFound {
                match std::fs::read_link(path) {
                    Ok(target) => format!("is a symbolic link to `{}`, which does not exist", target.display()),
                    Err(_) => "is a broken symbolic link".to_string(),
                }
            } else if e.kind() == std::io::ErrorKind::NotFound {
                "does not exist".to_string()
            } else if e.kind() == std::io::ErrorKind::PermissionDenied {
                "cannot be read: permission denied".to_string()
            } else {
                format!("cannot be read: {e}")
            })
        }
    }
}

/// `ELOOP` on the platforms medssl builds on (Linux: 40; macOS and the BSDs: 62).
const fn libc_eloop() -> i32 {
    if cfg!(any(target_os = "macos", target_os = "ios", target_os = "freebsd")) {
        62
    } else {
        40
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_a_path_is() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        assert_eq!(not_a_file_or_folder(&file), None);
        assert_eq!(not_a_file_or_folder(dir.path()), None);
        let missing = not_a_file_or_folder(&dir.path().join("nope")).unwrap();
        assert_eq!(missing, "does not exist");
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        assert!(not_a_file_or_folder(&a).unwrap().contains("symbolic link loop"));
        let dangling = dir.path().join("d");
        std::os::unix::fs::symlink(dir.path().join("gone"), &dangling).unwrap();
        assert!(not_a_file_or_folder(&dangling)
            .unwrap()
            .contains("which does not exist"));
        if Path::new("/dev/zero").exists() {
            assert!(not_a_file_or_folder(Path::new("/dev/zero"))
                .unwrap()
                .contains("character device"));
        }
    }
}
