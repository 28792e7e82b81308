//! systemd integration over `$NOTIFY_SOCKET` (the `sd_notify` protocol, without libsystemd).
//!
//! Under a `Type=notify` unit, systemd passes the path of a datagram socket; the agent sends
//! `READY=1` once it serves (store recovered, API listening), a `STATUS=` line whenever what
//! it serves or its broker link changes, `WATCHDOG=1` at half the unit's `WatchdogSec`, and
//! `STOPPING=1` on the way out. Outside systemd (no `$NOTIFY_SOCKET`) all of this is a no-op.
//!
//! The keep-alives come from a task on the same runtime as the pipeline, after it has looked
//! at the model table and the link: a runtime that is wedged (every worker blocked) stops
//! them, and systemd restarts the agent (`Restart=on-failure`).

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::serve::ModelTable;

/// A connection to the service manager's notification socket.
pub struct Notifier {
    socket: UnixDatagram,
}

impl Notifier {
    /// The notifier systemd asked for, if any: `$NOTIFY_SOCKET` is a filesystem path or, with a
    /// leading `@`, a Linux abstract socket name.
    pub fn from_env() -> Option<Notifier> {
        let address = std::env::var_os("NOTIFY_SOCKET")?;
        match Notifier::connect(Path::new(&address)) {
            Ok(notifier) => Some(notifier),
            Err(e) => {
                tracing::warn!(socket = ?address, error = %e, "NOTIFY_SOCKET is set but unusable; not notifying systemd");
                None
            }
        }
    }

    /// Connects to the socket at `address` (see [`Notifier::from_env`]).
    pub fn connect(address: &Path) -> io::Result<Notifier> {
        let socket = UnixDatagram::unbound()?;
        let text = address.as_os_str().as_encoded_bytes();
        match text.strip_prefix(b"@") {
            Some(name) => connect_abstract(&socket, name)?,
            None => socket.connect(address)?,
        }
        Ok(Notifier { socket })
    }

    /// Sends one or more `KEY=value` lines in one datagram.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.socket.send(state.as_bytes()).map(|_| ())
    }

    fn notify_or_log(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            tracing::warn!(error = %e, state, "could not notify systemd");
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn connect_abstract(socket: &UnixDatagram, name: &[u8]) -> io::Result<()> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.connect_addr(&address)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn connect_abstract(_: &UnixDatagram, _: &[u8]) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket names exist only on Linux",
    ))
}

/// How often systemd wants a keep-alive: half of `$WATCHDOG_USEC`, when it is set for this
/// process (`$WATCHDOG_PID`, if present, names the process meant).
pub fn watchdog_period_from_env() -> Option<Duration> {
    watchdog_period(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_period(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != own_pid {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// The status line systemd shows in `systemctl status edge-agent`.
pub fn status_line(models: &ModelTable, broker_connected: bool) -> String {
    let mut serving: Vec<String> = models
        .list()
        .iter()
        .map(|m| format!("{} {}", m.name, m.version))
        .collect();
    serving.sort();
    let serving = if serving.is_empty() {
        "no model".to_string()
    } else {
        serving.join(", ")
    };
    let link = if broker_connected {
        "broker connected"
    } else {
        "broker not connected"
    };
    format!("serving {serving}; {link}")
}

/// Tells systemd the agent serves, then keeps it informed until the task is aborted: a new
/// `STATUS=` whenever the line changes, and `WATCHDOG=1` every `watchdog` period if set.
pub async fn run(
    notifier: Arc<Notifier>,
    watchdog: Option<Duration>,
    models: Arc<ModelTable>,
    mut connected: tokio::sync::watch::Receiver<bool>,
) {
    let mut status = status_line(&models, *connected.borrow());
    notifier.notify_or_log(&format!("READY=1\nSTATUS={status}"));
    tracing::info!(
        watchdog = ?watchdog,
        "told systemd the agent is ready"
    );
    // Without a watchdog the line is still refreshed, just less often.
    let period = watchdog.unwrap_or(Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut link_alive = true;
    loop {
        // The link reports every reconnect attempt, changed or not: only the tick feeds the
        // watchdog. The link gone means shutting down: keep the watchdog fed meanwhile.
        let keep_alive = tokio::select! {
            _ = tick.tick() => watchdog.is_some(),
            changed = connected.changed(), if link_alive => {
                link_alive = changed.is_ok();
                false
            }
        };
        let now = status_line(&models, *connected.borrow());
        let mut message = String::new();
        if keep_alive {
            message.push_str("WATCHDOG=1\n");
        }
        if now != status {
            message.push_str(&format!("STATUS={now}\n"));
            status = now;
        }
        if !message.is_empty() {
            notifier.notify_or_log(message.trim_end());
        }
    }
}

/// Says the agent is shutting down (systemd then waits for it instead of counting a failure).
pub fn stopping(notifier: &Notifier) {
    notifier.notify_or_log("STOPPING=1\nSTATUS=stopping");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_period_is_half_the_interval_and_only_for_this_process() {
        assert_eq!(
            watchdog_period(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_period(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_period(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_period(Some("0"), None, 7), None);
        assert_eq!(watchdog_period(Some("soon"), None, 7), None);
        assert_eq!(watchdog_period(None, Some("7"), 7), None);
    }

    #[test]
    fn messages_reach_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        Notifier::connect(&path).unwrap().notify("READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("driftgate-test-{}", std::process::id());
            let address = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
            let server = UnixDatagram::bind_addr(&address).unwrap();
            Notifier::connect(Path::new(&format!("@{name}")))
                .unwrap()
                .notify("WATCHDOG=1")
                .unwrap();
            let n = server.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"WATCHDOG=1");
        }
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        assert!(Notifier::connect(Path::new("/nonexistent/driftgate/notify")).is_err());
    }
}
