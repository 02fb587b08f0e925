//! A per-test temporary directory that is kept for inspection when the test fails.

use std::path::{Path, PathBuf};
use std::thread;

use crate::{PREFIX, next_id, sanitize_tag};

/// `$TMPDIR/ipl-<pid>-<n>-<tag>`, removed on drop unless the thread is panicking, in which case
/// its path is printed and it is kept.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// # Panics
    /// When the directory cannot be created.
    #[must_use]
    pub fn new(tag: &str) -> TestDir {
        let path = std::env::temp_dir().join(format!(
            "{PREFIX}{}-{}-{}",
            std::process::id(),
            next_id(),
            sanitize_tag(tag)
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TestDir { path }
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("ipop-lab: test failed; keeping {}", self.path.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("ipop-lab: cannot remove {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_on_success() {
        let dir = TestDir::new("rm");
        let path = dir.path().to_owned();
        std::fs::write(path.join("f"), "x").expect("write a file");
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn kept_when_panicking() {
        let dir = TestDir::new("keep");
        let path = dir.path().to_owned();
        let result = std::panic::catch_unwind(move || {
            let _dir = dir;
            panic!("a failing test");
        });
        assert!(result.is_err());
        let kept = path.exists();
        std::fs::remove_dir_all(&path).expect("clean up the kept directory");
        assert!(kept, "the directory of a failed test is kept");
    }
}
