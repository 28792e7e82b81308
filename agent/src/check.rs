//! The first load of a new model version, in a child process under a memory limit.
//!
//! A model is closer to code than to data: tract folds its constants and allocates its tensors
//! while it builds the plan, and a file of a few hundred bytes can ask for terabytes (a
//! `ConstantOfShape` of `[2^40, 4]`). In a Rust process an allocation that fails aborts the
//! whole process, and one that succeeds can take all of a device's memory: neither may happen
//! to the agent that serves the current version. So before a new version serves, the agent
//! runs its own binary as `edge-agent check-model`, which caps its own address space
//! (`RLIMIT_AS`), loads the version from the store, builds the plan, runs the self-test and
//! prints what it found as one line of JSON. Only a version that passed there is loaded into
//! the agent. A child that dies (`memory allocation of N bytes failed`), runs past the
//! timeout, or reports an error fails the install with that reason, and the agent goes on
//! serving what it served.
//!
//! Versions already installed (at start-up, on a local rollback) passed this check when they
//! were installed and load in process.
//!
//! The isolation is on by default (`[check] isolate`). The child dies with the agent
//! (`PR_SET_PDEATHSIG`), so a check never outlives the agent that asked for it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleet_protocol::{ModelName, ModelVersion};
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;
use crate::directive::check_model;
use crate::store::ModelStore;

/// The subcommand of the agent's binary that runs the check.
pub const SUBCOMMAND: &str = "check-model";

/// How much of the child's stderr is kept for the reason of a failure (its last bytes).
const STDERR_TAIL_BYTES: usize = 16 * 1024;

/// Where a new version is checked before it serves.
#[derive(Debug, Clone)]
pub enum ModelCheck {
    /// In the agent's own process, with no bound on what loading takes: for agents run inside
    /// another program (`fleet-server demo`), which cannot start `edge-agent check-model`.
    InProcess,
    /// In a child process: `program check-model …`, bounded by `[check]` in the config.
    Isolated { program: PathBuf },
}

impl ModelCheck {
    /// Isolated checks with this very binary (an `edge-agent`), or in process when its path
    /// cannot be found.
    /// Checks in a child process running this very binary, once a trial run shows that it
    /// can: where it cannot (an ARM build run by qemu-user without binfmt, whose child the
    /// kernel refuses to execute), new models load in process, with a warning.
    pub fn with_this_binary() -> ModelCheck {
        let program = match std::env::current_exe() {
            Ok(program) => program,
            Err(e) => {
                tracing::warn!(error = %e, "cannot find the agent's own binary; new models load in process, without a memory bound");
                return ModelCheck::InProcess;
            }
        };
        match runs_here(&program) {
            Ok(()) => ModelCheck::Isolated { program },
            Err(why) => {
                tracing::warn!(program = %program.display(), %why, "the agent cannot start its own binary; new models load in process, without a memory bound");
                ModelCheck::InProcess
            }
        }
    }
}

/// Whether `program` starts here and is an edge-agent: it prints its version.
fn runs_here(program: &Path) -> Result<(), String> {
    let output = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if output.status.success() && stdout.starts_with("edge-agent ") {
        Ok(())
    } else {
        Err(format!(
            "`--version` gave {}: {:?}",
            output.status,
            stdout.trim().chars().take(200).collect::<String>()
        ))
    }
}

/// What a child found, printed as one line of JSON on its stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `None` when the version loaded and passed its self-test.
    pub error: Option<String>,
    /// Reading, verifying and building the plan, in milliseconds.
    pub load_ms: f64,
    /// The child's peak resident memory in KiB (the model's footprint, roughly, above the
    /// binary's own few MiB).
    pub peak_rss_kib: u64,
}

/// The arguments of `edge-agent check-model`.
#[derive(Debug, Clone)]
pub struct ChildArgs {
    pub data_dir: PathBuf,
    pub release_keys: Vec<PathBuf>,
    pub model: ModelName,
    pub version: ModelVersion,
    /// Address space the check may take beyond what the process holds when it starts; 0 for
    /// no limit.
    pub max_memory_mib: u64,
    /// The agent that asked: the check dies with it.
    pub parent_pid: Option<u32>,
}

/// The child's side: caps its own address space, then loads and self-tests the version.
/// Errors are part of the report; only the limit itself failing is an `Err`.
pub fn run_child(args: &ChildArgs) -> std::io::Result<Report> {
    if let Some(parent) = args.parent_pid {
        die_with(parent)?;
    }
    if args.max_memory_mib > 0 {
        limit_address_space(args.max_memory_mib.saturating_mul(1024 * 1024))?;
    }
    let started = Instant::now();
    let error = load_and_test(args).err();
    Ok(Report {
        error,
        load_ms: started.elapsed().as_secs_f64() * 1e3,
        peak_rss_kib: peak_rss_kib(),
    })
}

fn load_and_test(args: &ChildArgs) -> Result<(), String> {
    let keys = crate::daemon::read_key_ring(&args.release_keys, "release")
        .map_err(|e| format!("{e:#}"))?;
    let store = ModelStore::reader(&args.data_dir);
    let stored = store
        .load(&args.model, &args.version, &keys)
        .map_err(|e| e.to_string())?;
    check_model(&stored).map(drop)
}

/// Makes this process die with `parent`, the agent. A check outliving its agent (killed, or
/// crashed) would go on using up to `[check] max_memory_mib` beside the restarted agent's own
/// check, for a result nobody reads. Set here, after `exec`, rather than between fork and
/// exec: a `pre_exec` hook would make the standard library fork and `execvp`, and `execvp`
/// runs a binary the kernel cannot execute (an ARM agent under qemu-user, without binfmt) as
/// a shell script instead of failing. The signal comes when the thread that spawned this
/// process ends: `check_in_child` waits for the check on that very thread.
#[cfg(target_os = "linux")]
fn die_with(parent: u32) -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and no pointers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The agent may have died before the prctl: then no signal comes.
    if std::os::unix::process::parent_id() != parent {
        return Err(std::io::Error::other(
            "the agent that asked for the check is gone",
        ));
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn die_with(_parent: u32) -> std::io::Result<()> {
    Ok(())
}

/// Sets `RLIMIT_AS` to what the process maps now plus `extra` bytes, so that an allocation
/// beyond it fails at once instead of taking the device's memory.
fn limit_address_space(extra: u64) -> std::io::Result<()> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("unreadable /proc/self/statm: {statm:?}")))?;
    // SAFETY: sysconf reads a constant of the system and has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = u64::try_from(page).unwrap_or(4096).max(1);
    let bytes = pages.saturating_mul(page).saturating_add(extra);
    let limit = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    };
    // SAFETY: `limit` is a valid rlimit that outlives the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn peak_rss_kib() -> u64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    u64::try_from(usage.ru_maxrss).unwrap_or(0)
}

/// Why the parent could not learn anything from a child.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The child could not be started at all (the binary is gone, or it cannot be executed
    /// here): the caller may fall back to checking in process.
    #[error("cannot start {program}: {cause}")]
    Spawn {
        program: PathBuf,
        cause: std::io::Error,
    },
    /// The version failed: the reason is for the reported state.
    #[error("{0}")]
    Failed(String),
}

/// The parent's side: runs `program check-model` for the version and waits for its report,
/// at most `[check] timeout_secs`.
pub fn check_in_child(
    program: &Path,
    config: &AgentConfig,
    model: &ModelName,
    version: &ModelVersion,
) -> Result<Report, CheckError> {
    let limits = &config.check;
    let mut command = Command::new(program);
    command
        .arg(SUBCOMMAND)
        .arg("--data-dir")
        .arg(&config.data_dir)
        .args(["--model", model.as_str(), "--version", version.as_str()])
        .arg("--max-memory-mib")
        .arg(limits.max_memory_mib.to_string())
        .arg("--parent-pid")
        .arg(std::process::id().to_string());
    for key in &config.trust.release_keys {
        command.arg("--release-key").arg(key);
    }
    // The reason is read off the child's stderr: a panic's message, not its backtrace.
    let mut child = command
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|cause| CheckError::Spawn {
            program: program.to_path_buf(),
            cause,
        })?;
    // Both pipes are drained while the child runs, so a chatty child cannot block on a full
    // pipe and be taken for a hung one.
    let stdout = drain(child.stdout.take(), usize::MAX);
    let stderr = drain(child.stderr.take(), STDERR_TAIL_BYTES);
    let timeout = Duration::from_secs(limits.timeout_secs);
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CheckError::Failed(format!(
                    "lost the model check process: {e}"
                )));
            }
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let Some(status) = status else {
        return Err(CheckError::Failed(format!(
            "loading and self-testing the model took more than {} s ([check] timeout_secs)",
            limits.timeout_secs
        )));
    };
    let report = String::from_utf8_lossy(&stdout)
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str::<Report>(line).ok());
    match report {
        Some(Report {
            error: Some(error), ..
        }) => Err(CheckError::Failed(error)),
        Some(report) if status.success() => Ok(report),
        _ => {
            let stderr = String::from_utf8_lossy(&stderr);
            tracing::warn!(%model, %version, %status, stderr = %stderr.trim(), "the model check process ended without a report");
            Err(CheckError::Failed(death_reason(
                &status,
                &stderr,
                limits.max_memory_mib,
            )))
        }
    }
}

/// Reads a child's pipe to its end on a thread, keeping the last `keep` bytes.
fn drain<R: Read + Send + 'static>(
    pipe: Option<R>,
    keep: usize,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let Some(mut pipe) = pipe else {
            return kept;
        };
        let mut buffer = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buffer) {
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buffer[..n]);
            if kept.len() > keep {
                kept.drain(..kept.len() - keep);
            }
        }
        kept
    })
}

/// The reason for a child that ended without a report.
fn death_reason(status: &std::process::ExitStatus, stderr: &str, max_memory_mib: u64) -> String {
    let last = stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("no output");
    // Rust's own message (`memory allocation of N bytes failed`, then an abort) or tract's
    // (a panic: `failed to allocate Layout { size: N, … }`).
    if let Some(allocation) = stderr
        .lines()
        .rev()
        .find(|line| line.contains("memory allocation of") || line.contains("failed to allocate"))
    {
        return format!(
            "the model needs more memory than the {max_memory_mib} MiB a model may take \
             ([check] max_memory_mib): {}",
            allocation.trim()
        );
    }
    // A panic prints `thread '…' panicked at FILE:LINE:COL:`, then its message, then a note.
    let lines: Vec<&str> = stderr.lines().map(str::trim).collect();
    if let Some(at) = lines.iter().rposition(|line| line.contains("panicked at")) {
        let message: Vec<&str> = lines[at + 1..]
            .iter()
            .take_while(|line| !line.starts_with("note:") && !line.starts_with("stack backtrace"))
            .copied()
            .collect();
        return format!(
            "loading or self-testing the model panicked ({status}): {}",
            message.join(" ")
        );
    }
    format!("the model check process ended without a report ({status}): {last}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_program_that_is_not_an_agent_does_not_run_checks() {
        assert!(runs_here(Path::new("/nonexistent/edge-agent")).is_err());
        let why = runs_here(Path::new("/bin/true")).unwrap_err();
        assert!(why.contains("--version"), "{why}");
    }

    #[test]
    fn an_allocation_failure_names_the_limit_and_the_allocation() {
        let status = std::process::ExitStatus::from_raw(libc::SIGABRT);
        let reason = death_reason(
            &status,
            "INFO trusting release key\nmemory allocation of 17592186044416 bytes failed\n",
            512,
        );
        assert!(reason.contains("512 MiB"), "{reason}");
        assert!(reason.contains("[check] max_memory_mib"), "{reason}");
        assert!(reason.contains("17592186044416 bytes"), "{reason}");
    }

    #[test]
    fn another_death_gives_the_status_and_the_last_line() {
        let status = std::process::ExitStatus::from_raw(libc::SIGSEGV);
        let reason = death_reason(&status, "first\nlast words\n\n", 512);
        assert!(reason.contains("last words"), "{reason}");
        assert!(reason.contains("signal"), "{reason}");
    }

    #[test]
    fn tracts_allocation_panic_names_the_limit_too() {
        let status = std::process::ExitStatus::from_raw(101 << 8);
        let stderr = "thread 'main' (7) panicked at tract-data/src/blob.rs:76:13:\nfailed to allocate Layout { size: 17179869184, align: 64 (1 << 6) }\nnote: …\n";
        let reason = death_reason(&status, stderr, 256);
        assert!(reason.contains("256 MiB"), "{reason}");
        assert!(reason.contains("size: 17179869184"), "{reason}");
    }

    #[test]
    fn a_panic_gives_its_message() {
        let status = std::process::ExitStatus::from_raw(101 << 8);
        let stderr = "\nthread 'main' (7) panicked at src/x.rs:1:2:\nshape overflow\nnote: run with `RUST_BACKTRACE=1`\n";
        let reason = death_reason(&status, stderr, 512);
        assert!(
            reason.ends_with("panicked (exit status: 101): shape overflow"),
            "{reason}"
        );
    }

    #[test]
    fn the_report_round_trips_as_one_line() {
        let report = Report {
            error: Some("self-test output differs".into()),
            load_ms: 12.5,
            peak_rss_kib: 9000,
        };
        let line = serde_json::to_string(&report).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Report>(&line).unwrap(), report);
    }
}
