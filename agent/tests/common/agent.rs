//! A real `edge-agent` process for end-to-end tests, and what the tests ask of it.

use std::path::Path;
use std::process::{Child, Stdio};

use fleet_protocol::tensor::compare_outputs;
use fleet_protocol::{Manifest, ModelState, State, Tensor};

use super::http;

/// An agent process, killed (SIGKILL) when dropped.
pub struct Agent {
    child: Child,
}

impl Agent {
    pub fn start(dir: &Path) -> Agent {
        Agent::start_with_env(dir, &[])
    }

    /// Starts the agent with extra environment variables (`NOTIFY_SOCKET`, …).
    pub fn start_with_env(dir: &Path, env: &[(&str, &std::ffi::OsStr)]) -> Agent {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .unwrap();
        // Another build of the agent may stand in (`DRIFTGATE_AGENT_BINARY`, an absolute
        // path): the release binary of an ARM target, run through `DRIFTGATE_TARGET_RUNNER`.
        let binary = std::env::var_os("DRIFTGATE_AGENT_BINARY")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_edge-agent").into());
        let child = driftgate_tests::target_command(binary)
            .args(["run", "--config"])
            .arg(dir.join("agent.toml"))
            .env("DRIFTGATE_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("edge-agent starts");
        Agent { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown code runs, as after a power cut (minus the page cache).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `agent.toml` (and the trusted public keys) into `dir`; `extra` is appended verbatim
/// for sections a test needs (`[probation]`, …).
pub fn write_config(dir: &Path, device: &str, broker_port: u16, api_port: u16, extra: &str) {
    super::write_public_keys(dir);
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            r#"
device_id = "{device}"
data_dir = "data"
[broker]
url = "mqtt://127.0.0.1:{broker_port}"
reconnect_min_ms = 50
reconnect_max_ms = 1000
[trust]
release_keys = ["release.pub"]
fleet_keys = ["fleet.pub"]
[api]
listen = "127.0.0.1:{api_port}"
{extra}
"#
        ),
    )
    .unwrap();
}

pub fn model<'a>(state: &'a State, name: &str) -> Option<&'a ModelState> {
    state.models.iter().find(|m| m.name.as_str() == name)
}

pub fn active_version(state: &State, name: &str) -> Option<String> {
    model(state, name)
        .and_then(|m| m.active.as_ref())
        .map(|a| a.version.to_string())
}

/// Sends `manifest`'s self-test inputs to the agent's API and returns the status, the version
/// that answered and the outputs.
pub fn infer(api_port: u16, manifest: &Manifest) -> (u16, Option<String>, Vec<Tensor>, String) {
    let name = manifest.name.as_str();
    let body = serde_json::json!({ "inputs": manifest.self_test.inputs });
    let (status, text) = http(
        api_port,
        "POST",
        &format!("/v2/models/{name}/infer"),
        body.to_string().as_bytes(),
    );
    if status != 200 {
        return (status, None, Vec::new(), text);
    }
    let response: serde_json::Value = serde_json::from_str(&text).unwrap();
    let version = response["model_version"].as_str().map(str::to_string);
    let outputs: Vec<Tensor> = serde_json::from_value(response["outputs"].clone()).unwrap();
    (status, version, outputs, text)
}

/// Whether `outputs` are `manifest`'s self-test outputs.
pub fn matches_self_test(manifest: &Manifest, outputs: &[Tensor]) -> Result<(), String> {
    compare_outputs(
        &manifest.self_test.outputs,
        outputs,
        manifest.self_test.tolerance,
    )
    .map_err(|e| e.to_string())
}

/// Runs `manifest`'s self-test case through the API and panics unless that very version
/// answers with the expected outputs, which it returns.
pub fn infer_matches_self_test(api_port: u16, manifest: &Manifest) -> Vec<Tensor> {
    let (status, version, outputs, text) = infer(api_port, manifest);
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        version.as_deref(),
        Some(manifest.version.as_str()),
        "{text}"
    );
    matches_self_test(manifest, &outputs).unwrap_or_else(|e| {
        panic!(
            "{} {} through the API: {e}",
            manifest.name, manifest.version
        )
    });
    outputs
}

/// The link's and the uplink's counters from the agent's `/metrics`, one per line: what a
/// test that waited in vain for uploads should show.
pub fn link_metrics(api_port: u16) -> String {
    let (status, text) = http(api_port, "GET", "/metrics", b"");
    if status != 200 {
        return format!("/metrics answered {status}: {text}");
    }
    text.lines()
        .filter(|line| {
            line.starts_with("driftgate_link_")
                || line.starts_with("driftgate_uplink_")
                || line.starts_with("driftgate_dropped_messages_total")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Polls until the API answers `/v2/health/live` with 200. An accepted connection is not
/// enough: right after a SIGKILL the killed agent's listening socket can linger for a few
/// milliseconds (held by a child it was starting, until that child's `exec`), accept, and
/// then reset.
pub fn wait_for_api(api_port: u16) {
    use std::io::{Read, Write};
    let live = || -> std::io::Result<bool> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", api_port))?;
        stream.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        stream.write_all(
            b"GET /v2/health/live HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n",
        )?;
        let mut status_line = [0u8; 12];
        stream.read_exact(&mut status_line)?;
        Ok(status_line.starts_with(b"HTTP/1.1 200"))
    };
    for _ in 0..500 {
        if matches!(live(), Ok(true)) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("the agent's API did not come up on port {api_port}");
}

/// VmRSS of a process, in KiB (under qemu-user, the emulator's own memory included).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The end of the agent's log in `dir`, for failure messages.
pub fn log_tail(dir: &Path) -> String {
    // Lossy: a SIGKILL can cut a line in the middle of a character.
    let bytes = std::fs::read(dir.join("agent.log")).unwrap_or_default();
    let log = String::from_utf8_lossy(&bytes);
    let lines = fold_repeats(log.lines());
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Folds runs of lines that say the same thing (say, a reconnect warning every second of an
/// outage) into their first line and a count, so that a tail shows what happened around them.
/// Lines say the same thing when they agree up to their first field (`name=value`).
fn fold_repeats<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<String> {
    fn message(line: &str) -> &str {
        // tracing's plain format: timestamp, level, target, message, fields.
        let without_time = line.split_once(' ').map_or(line, |(_, rest)| rest);
        without_time.split('=').next().unwrap_or(without_time)
    }
    let mut folded: Vec<String> = Vec::new();
    let mut last_message: Option<&str> = None;
    let mut repeats = 0usize;
    let flush = |folded: &mut Vec<String>, repeats: &mut usize| {
        if *repeats > 0 {
            folded.push(format!("  … and {repeats} more like the line above"));
            *repeats = 0;
        }
    };
    for line in lines {
        let message = message(line);
        if last_message == Some(message) {
            repeats += 1;
            continue;
        }
        flush(&mut folded, &mut repeats);
        folded.push(line.to_string());
        last_message = Some(message);
    }
    flush(&mut folded, &mut repeats);
    folded
}
