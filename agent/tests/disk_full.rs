//! Issue 9: the agent's data disk full. The agent keeps serving, reports the condition, and
//! recovers when space returns.
//!
//! A real agent process has its data dir on a tmpfs of its own (16 MiB), so "full" is the
//! kernel's `ENOSPC`, not a simulation. The test installs v1, then fills the tmpfs with a file
//! of its own and checks, while the disk stays full:
//! - the API serves v1's answers;
//! - the reported state carries the `disk_full` condition;
//! - a directive for v2 fails for want of space, says so, and v1 goes on serving.
//!
//! It kills the agent and starts it again on the full disk: it serves v1 and reports the
//! condition. Then it deletes the file and checks that the condition clears, that v2 installs without
//! another directive, that the inferences served afterwards reach the receiver as telemetry,
//! and that the outbox passes SQLite's integrity check.
//!
//! Mounting needs root (`CAP_SYS_ADMIN`): the test runs when `DRIFTGATE_TEST_TMPFS` is set,
//! which `.ci/run` does after checking that it can mount one.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::agent::{
    infer_matches_self_test, link_metrics, log_tail, wait_for_api, write_config, Agent,
};
use common::receiver::Receiver;
use common::{directive, sample_manifest, sign_manifest, Control, Faults, Responder};
use fleet_protocol::outbox::{EventKind, ItemBody};
use fleet_protocol::state::{Condition, InstallPhase, State};

const TMPFS_BYTES: u64 = 16 * 1024 * 1024;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, bytes: u64) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mount -t tmpfs {}: {status}",
            path.display()
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: the agent may still be winding down.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Writes `path` until the file system refuses: first in 1 MiB pieces, then byte by byte
/// pieces of 4 KiB, so that not even a page is left. Returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).unwrap();
    let mut written = 0u64;
    for piece in [1024 * 1024, 4096] {
        let block = vec![0xA5u8; piece];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    let _ = file.sync_all();
    written
}

fn disk_full(state: &State) -> bool {
    state
        .conditions
        .iter()
        .any(|c| c.code == Condition::DISK_FULL)
}

fn active(state: &State, version: &str) -> bool {
    state.models.iter().any(|m| {
        m.name.as_str() == "digits-mlp"
            && m.active
                .as_ref()
                .is_some_and(|a| a.version.as_str() == version)
    })
}

/// Inferences the receiver's telemetry items count, and the event kinds it holds.
fn received(receiver: &Receiver) -> (u64, Vec<EventKind>) {
    let items = receiver.items.lock().unwrap();
    let mut counted = 0;
    let mut events = Vec::new();
    for item in items.values() {
        match &item.body {
            ItemBody::Telemetry(t) => counted += t.inferences,
            ItemBody::Event(e) => events.push(e.event),
            _ => {}
        }
    }
    (counted, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_disk_stops_writes_not_serving_and_heals_when_space_returns() {
    let test = "a_full_data_disk_stops_writes_not_serving_and_heals_when_space_returns";
    if !driftgate_tests::require_env(
        test,
        "DRIFTGATE_TEST_TMPFS",
        "root, to mount a tmpfs as the agent's full data disk",
    ) {
        return;
    }
    for broker in common::brokers(test) {
        eprintln!("broker: {}", broker.name);
        let device = "dev-disk";
        let dir = tempfile::tempdir().unwrap();
        let data = Tmpfs::mount(&dir.path().join("data"), TMPFS_BYTES);
        let api_port = common::free_port();
        write_config(
            dir.path(),
            device,
            broker.port,
            api_port,
            "[telemetry]\ninterval_secs = 1",
        );
        let (v1_bytes, v1) = sample_manifest("digits-mlp", "v1", 1);
        let (v2_bytes, v2) = sample_manifest("digits-mlp", "v2", 2);
        let responder = Responder::start(broker.port, Faults::default()).await;
        responder.add(v1_bytes);
        responder.add(v2_bytes);
        let receiver = Receiver::start(broker.port, device, Vec::new()).await;
        let mut control = Control::start(broker.port, device).await;
        let mut agent = Agent::start(dir.path());
        control.wait_for("the agent's first state", |_| true).await;
        control.install(device, 1, &v1, false).await;
        for _ in 0..20 {
            infer_matches_self_test(api_port, &v1);
        }
        // Telemetry flows before the disk fills.
        let deadline = Instant::now() + Duration::from_secs(20);
        while received(&receiver).0 < 20 {
            assert!(Instant::now() < deadline, "no telemetry before the fill");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Fill the disk.
        let filler = data.path.join("filler");
        let filled = fill(&filler);
        eprintln!("filled the data disk with {filled} bytes");

        // It keeps serving, while the outbox fails to store telemetry behind it.
        let serving_full = Instant::now();
        let mut served_full = 0u64;
        while serving_full.elapsed() < Duration::from_secs(3) {
            infer_matches_self_test(api_port, &v1);
            served_full += 1;
        }
        let state = control.wait_for("the disk_full condition", disk_full).await;
        let condition = state
            .conditions
            .iter()
            .find(|c| c.code == Condition::DISK_FULL)
            .unwrap();
        eprintln!("served {served_full} inferences on the full disk; reported: {condition:?}");

        // A new version cannot be staged: the install fails and says why; v1 serves on.
        control
            .publish_directive(
                device,
                directive(device, 2, vec![(sign_manifest(&v2), false)]),
            )
            .await;
        // Where it fails depends on what the kernel refuses first: persisting the accepted
        // directive (reported as a refusal), or staging the download (the install's phase).
        let state = control
            .wait_for("v2 failing for want of space", |s| {
                let refused = s
                    .refused
                    .as_ref()
                    .is_some_and(|r| r.seq == Some(2) && r.code == Condition::DISK_FULL);
                let failed = s.models.iter().any(|m| {
                    matches!(&m.phase, InstallPhase::Failed { reason } if reason.contains("disk has room"))
                });
                refused || failed
            })
            .await;
        eprintln!(
            "v2 on the full disk: refused {:?}, phases {:?}",
            state.refused,
            state.models.iter().map(|m| &m.phase).collect::<Vec<_>>()
        );
        assert!(active(&state, "v1"), "{state:#?}");
        assert!(disk_full(&state), "{state:#?}");
        infer_matches_self_test(api_port, &v1);

        // A restart on the full disk (a watchdog, a power cut): the agent comes back serving v1
        // and reports the condition again.
        agent.kill();
        agent = Agent::start(dir.path());
        wait_for_api(api_port);
        infer_matches_self_test(api_port, &v1);
        let restarted = Instant::now();
        control
            .wait_for("the disk_full condition after the restart", |s| {
                disk_full(s) && s.at_ms > state.at_ms
            })
            .await;
        eprintln!(
            "restarted on the full disk: serving v1, condition reported again in {:?}",
            restarted.elapsed()
        );

        // Space returns: the condition clears and v2 installs without another directive.
        std::fs::remove_file(&filler).unwrap();
        let recovered = Instant::now();
        let state = control
            .wait_for("the disk_full condition cleared and v2 active", |s| {
                !disk_full(s) && active(s, "v2")
            })
            .await;
        let healed_in = recovered.elapsed();
        assert!(state.conditions.is_empty(), "{state:#?}");
        // What is served now reaches the server again (counted from before the first of these
        // inferences: on a slow machine the first interval's telemetry arrives while the rest
        // are served), and the outbox file is sound.
        let (before, _) = received(&receiver);
        for _ in 0..20 {
            infer_matches_self_test(api_port, &v2);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let (counted, events) = loop {
            let (counted, events) = received(&receiver);
            if counted >= before + 20 && events.contains(&EventKind::Activated) {
                let activations = events
                    .iter()
                    .filter(|e| **e == EventKind::Activated)
                    .count();
                let accepted = events
                    .iter()
                    .filter(|e| **e == EventKind::DirectiveAccepted)
                    .count();
                if activations >= 2 && accepted >= 2 {
                    break (counted, events);
                }
            }
            assert!(
                Instant::now() < deadline,
                "telemetry or v2's events never arrived after the recovery: {counted} \
                 inferences counted (before: {before}), events {events:?}\n{}\n{}",
                link_metrics(api_port),
                log_tail(dir.path())
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let db = rusqlite::Connection::open_with_flags(
            data.path.join("outbox.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let integrity: String = db
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .unwrap();
        assert_eq!(integrity, "ok");
        drop(agent);
        eprintln!(
            "healed in {healed_in:?} (condition cleared, v2 active); the receiver counts {counted} \
             inferences and holds events {events:?}"
        );
    }
}
