//! Running the `pare` binary from the integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The workspace root: fixture and asset paths in the tests are relative to it.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn pare(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pare")).args(args).current_dir(repo()).output().expect("run pare")
}

/// Run a `--json` command that must succeed; its one JSON object.
pub fn json(args: &[&str]) -> Value {
    let out = pare(args);
    assert!(out.status.success(), "pare {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// The command fails with exactly one line, `error: …` mentioning `needle`, and no panic.
pub fn one_line_error(args: &[&str], needle: &str) {
    let out = pare(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "pare {args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{stderr:?} should mention {needle:?}");
}

/// A path under the temp dir, unique to this test process, with nothing there yet.
pub fn scratch(prefix: &str, name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("pare-{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    path
}
