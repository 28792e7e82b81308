//! A slow disk for a process under test: a tiny `LD_PRELOAD` library that makes every
//! `fsync` and `fdatasync` wait first, as an SD card or a busy virtual disk does (tens of
//! milliseconds each). Built at test time with the C compiler Rust itself links with, so it
//! needs nothing beyond the toolchain.

use std::path::PathBuf;
use std::sync::OnceLock;

/// The environment variable the library reads: the delay per call, in microseconds.
pub const DELAY_VAR: &str = "DRIFTGATE_SLOW_FSYNC_US";

const SOURCE: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>

static void wait_a_while(void) {
    const char *us = getenv("DRIFTGATE_SLOW_FSYNC_US");
    usleep(us ? (useconds_t)atol(us) : 30000);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    wait_a_while();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    wait_a_while();
    return real(fd);
}
"#;

/// The C compilers to try for the architecture the tests run on: under qemu (cross/test-arm.sh)
/// the agent is an ARM process and needs an ARM library. `DRIFTGATE_TEST_CC` overrides.
fn compilers() -> Vec<String> {
    if let Ok(cc) = std::env::var("DRIFTGATE_TEST_CC") {
        return vec![cc];
    }
    let cross = match std::env::consts::ARCH {
        "aarch64" => Some("aarch64-linux-gnu-gcc"),
        "arm" => Some("arm-linux-gnueabihf-gcc"),
        _ => None,
    };
    cross
        .into_iter()
        .map(String::from)
        .chain(["cc".to_string(), "gcc".to_string()])
        .collect()
}

/// The library, built once per test process; or why it could not be built.
pub fn library() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT.get_or_init(build).clone()
}

fn build() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("driftgate-slow-fsync-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let source = dir.join("slow_fsync.c");
    let library = dir.join("slow_fsync.so");
    std::fs::write(&source, SOURCE).map_err(|e| format!("{}: {e}", source.display()))?;
    let mut failures = Vec::new();
    for cc in compilers() {
        let result = std::process::Command::new(&cc)
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&library)
            .arg(&source)
            .arg("-ldl")
            .output();
        match result {
            Ok(output) if output.status.success() => return Ok(library),
            Ok(output) => failures.push(format!(
                "{cc}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Err(e) => failures.push(format!("{cc}: {e}")),
        }
    }
    Err(format!(
        "no C compiler built the slow-fsync library ({})",
        failures.join("; ")
    ))
}
