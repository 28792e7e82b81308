//! The real agent process under a `Type=notify` unit, as systemd sees it: `READY=1` once the
//! API serves (even with no broker reachable), `WATCHDOG=1` at half of `$WATCHDOG_USEC`, a
//! `STATUS=` line, and `STOPPING=1` on SIGTERM. The socket here stands in for systemd's.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::agent::{log_tail, write_config, Agent};

/// The next datagram, or a panic naming what was awaited.
fn receive(socket: &UnixDatagram, what: &str, dir: &std::path::Path) -> String {
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!(
            "no {what} from the agent ({e}); its log:\n{}",
            log_tail(dir)
        ),
    }
}

#[test]
fn the_agent_notifies_readiness_keeps_the_watchdog_fed_and_says_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let api_port = common::free_port();
    // Nothing listens on the broker port: a device cut off from its fleet still serves.
    let unreachable_broker = common::free_port();
    write_config(dir.path(), "dev-systemd", unreachable_broker, api_port, "");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();

    let agent = Agent::start_with_env(
        dir.path(),
        &[
            ("NOTIFY_SOCKET", socket_path.as_os_str()),
            // 400 ms: keep-alives every 200 ms.
            ("WATCHDOG_USEC", std::ffi::OsStr::new("400000")),
        ],
    );

    let ready = receive(&socket, "READY=1", dir.path());
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready
            .lines()
            .any(|l| l == "STATUS=serving no model; broker not connected"),
        "{ready:?}"
    );
    // Ready means serving: the API answers now, not eventually.
    let (status, body) = common::http(api_port, "GET", "/v2/health/live", b"");
    assert_eq!(status, 200, "{body}");

    let started = Instant::now();
    let mut keep_alives = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let message = receive(&socket, "WATCHDOG=1", dir.path());
        assert!(
            !message.contains("READY=1"),
            "READY=1 sent twice: {message:?}"
        );
        keep_alives += message.lines().filter(|l| *l == "WATCHDOG=1").count();
    }
    let elapsed = started.elapsed().as_secs_f64();
    // One every 200 ms: about 10 in 2 s. A slow emulator may run late, never absent.
    assert!(
        keep_alives >= 5 && (keep_alives as f64) <= elapsed / 0.2 + 2.0,
        "{keep_alives} keep-alives in {elapsed:.2} s"
    );

    let status = std::process::Command::new("kill")
        .args(["-TERM", &agent.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let message = receive(&socket, "STOPPING=1", dir.path());
        if message.lines().any(|l| l == "STOPPING=1") {
            break;
        }
        assert!(Instant::now() < deadline, "no STOPPING=1 after SIGTERM");
    }
    eprintln!("READY=1 with the API up, {keep_alives} keep-alives in {elapsed:.2} s, STOPPING=1 on SIGTERM");
}
