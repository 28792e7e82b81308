//! Shared helpers for the end-to-end tests in `tests/tests/`.
//!
//! Tests that need a program from outside the Rust toolchain (Python packages, Mosquitto,
//! PostgreSQL, Chromium) run only when `.ci/run` has installed it and set the matching
//! environment variable; otherwise they print one line saying they were skipped and why.

pub mod onnx;
pub mod proxy;
pub mod slow_fsync;

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
/// Every file of the fuzz corpus (`fuzz/seeds/`: valid messages of every kind;
/// `fuzz/regressions/`: inputs that once crashed a decoder), each whole and cut in half, named
/// by its path under the corpus root.
pub fn fuzz_corpus() -> Vec<(String, Vec<u8>)> {
    let mut payloads = Vec::new();
    for dir in ["fuzz/seeds", "fuzz/regressions"] {
        let root = workspace_root().join(dir);
        let mut targets: Vec<PathBuf> = std::fs::read_dir(&root)
            .expect("the fuzz corpus")
            .map(|entry| entry.expect("a corpus dir").path())
            .collect();
        targets.sort();
        for target in targets {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&target)
                .expect("a corpus dir")
                .map(|entry| entry.expect("a corpus file").path())
                .collect();
            files.sort();
            for path in files {
                let bytes = std::fs::read(&path).expect("a corpus file");
                let name = path
                    .strip_prefix(&root)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                payloads.push((
                    format!("{name} (cut in half)"),
                    bytes[..bytes.len() / 2].to_vec(),
                ));
                payloads.push((name, bytes));
            }
        }
    }
    payloads
}

pub fn python() -> String {
    std::env::var("DRIFTGATE_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// A workspace binary built by `cargo test --workspace` (which builds every package's
/// binaries before running tests), in the same target dir as this test.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/debug/deps/this-test → target/debug/NAME
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executables live in target/PROFILE/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, or build it first \
         (cargo build -p fleet-server -p edge-agent)",
        path.display()
    );
    path
}

/// A command that runs `program`, a binary built for the target under test. When the tests
/// themselves run under an emulator (`cross/test-arm.sh` sets `DRIFTGATE_TARGET_RUNNER` to the
/// same `qemu-… -L …` line as cargo's runner), the binaries they start go through it too, so no
/// binfmt_misc registration is needed.
pub fn target_command(program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let runner = std::env::var("DRIFTGATE_TARGET_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        None => std::process::Command::new(program),
        Some(emulator) => {
            let mut command = std::process::Command::new(emulator);
            command.args(words).arg(program);
            command
        }
    }
}

/// One HTTP/1.1 request on a fresh loopback connection, written exactly as given (nothing
/// normalises the path), with `headers`, `Content-Length` and `Connection: close`. Returns the
/// status (0 when the reply has no status line) and the body.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("API reachable");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("a read timeout");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    stream
        .write_all(request.as_bytes())
        .expect("request written");
    stream.write_all(body).expect("body written");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("response read");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Runs a command; returns its stdout, or panics with its stderr.
pub fn run_ok(command: &mut std::process::Command) -> String {
    let out = command.output().expect("the command starts");
    assert!(
        out.status.success(),
        "{command:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free TCP port on 127.0.0.1 (free now; a race with another process is possible).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Polls `check` every 100 ms until it returns Some, or panics with `what` after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: std::time::Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A child process, killed when dropped; its stderr goes to a log file whose tail is
/// printed if the test fails while it runs.
pub struct Process {
    pub name: String,
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl Process {
    /// Starts `program args…` with stdout and stderr into `log`.
    pub fn start(name: &str, command: &mut std::process::Command, log: PathBuf) -> Process {
        let file = std::fs::File::create(&log).expect("log file");
        let child = command
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Process {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// The last lines of the log.
    pub fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGKILL, and reap it: no shutdown of any kind, as a power cut or the OOM killer does.
    pub fn sigkill(mut self) {
        self.child
            .kill()
            .unwrap_or_else(|e| panic!("SIGKILL {}: {e}", self.name));
        self.child
            .wait()
            .unwrap_or_else(|e| panic!("reap {}: {e}", self.name));
    }

    /// SIGTERM, then waits up to `grace` for it to exit (SIGKILL after that): a clean stop,
    /// as a service manager does it.
    pub fn stop(mut self, grace: std::time::Duration) {
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!(
            "{} did not stop within {grace:?} of SIGTERM; killing it",
            self.name
        );
    }

    /// Panics (with the log's tail) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited with {status}:\n{}", self.name, self.tail(40));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- {} (last lines of {}) ---\n{}",
                self.name,
                self.log.display(),
                self.tail(30)
            );
        }
    }
}
