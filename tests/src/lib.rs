//! Shared helpers for the end-to-end tests in `tests/tests/`.
//!
//! Tests that need a program from outside the Rust toolchain (Python packages, Mosquitto,
//! PostgreSQL, Chromium) run only when `.ci/run` has installed it and set the matching
//! environment variable; otherwise they print one line saying they were skipped and why.

use std::io::Write;
use std::path::PathBuf;

/// Whether the outside dependency behind `var` is available. When it is not, prints one line
/// to the real stderr (not the captured test output, so it shows in a passing run).
pub fn require_env(test: &str, var: &str, needs: &str) -> bool {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() && value != "0" => true,
        _ => {
            let _ = writeln!(
                std::io::stderr(),
                "skipped {test}: needs {needs}; set {var}=1 once it is installed (.ci/run does)"
            );
            false
        }
    }
}

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace root")
        .to_path_buf()
}

/// The Python interpreter to use: `$DRIFTGATE_PYTHON`, or `python3`.
pub fn python() -> String {
    std::env::var("DRIFTGATE_PYTHON").unwrap_or_else(|_| "python3".to_string())
}
