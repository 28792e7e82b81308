//! The data disk's condition: whether it has room for what the agent must write.
//!
//! A full data disk does not stop a device from serving: the active model is loaded and the
//! inference API needs no disk. What it stops is writing: the outbox cannot store telemetry,
//! a download cannot be staged. The agent goes on serving, says so in its reported state (the
//! `disk_full` condition, which needs no disk to send), and recovers by itself when space
//! returns: the outbox writes again, the uplink drains it, an install that failed for want of
//! space is taken up again.
//!
//! Two signals feed the condition. A write that fails with "no space left" (from the outbox
//! or the download) sets it at once. A periodic look at the file system (`statvfs`) sets it
//! when the free space falls under [`MIN_FREE_BYTES`] and clears it when the free space is
//! back above that. Subscribers (the directive controller, which publishes the state) see
//! each change through a watch channel.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_protocol::state::Condition;
use tokio::sync::watch;

/// Free space under which the data disk counts as full. Enough for a few hundred outbox
/// items and SQLite's journal, so that the agent reports the condition before writes fail.
pub const MIN_FREE_BYTES: u64 = 1024 * 1024;

/// How often the free space is read.
pub const CHECK_PERIOD: Duration = Duration::from_secs(2);

/// Watches the disk that holds the data dir. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct DiskWatch {
    data_dir: PathBuf,
    condition: watch::Sender<Option<Condition>>,
}

impl DiskWatch {
    pub fn new(data_dir: &Path) -> Self {
        DiskWatch {
            data_dir: data_dir.to_path_buf(),
            condition: watch::channel(None).0,
        }
    }

    /// The condition now (`None`: the disk has room), and each change after.
    pub fn subscribe(&self) -> watch::Receiver<Option<Condition>> {
        self.condition.subscribe()
    }

    pub fn condition(&self) -> Option<Condition> {
        self.condition.borrow().clone()
    }

    pub fn is_full(&self) -> bool {
        self.condition.borrow().is_some()
    }

    /// A write failed for want of space: the disk is full now, whatever `statvfs` said a
    /// moment ago. `what` names the write (`outbox`, `download of digits-mlp v2`).
    pub fn write_failed(&self, what: &str, error: &dyn std::fmt::Display) {
        let detail = format!("{what}: {error}");
        self.condition.send_if_modified(|condition| {
            if condition.is_some() {
                return false;
            }
            tracing::error!(data_dir = %self.data_dir.display(), %detail, "the data disk is full");
            *condition = Some(Condition {
                code: Condition::DISK_FULL.to_string(),
                detail,
                since_ms: now_ms(),
            });
            true
        });
    }

    /// Reads the free space and sets or clears the condition.
    pub fn check(&self) {
        let free = match free_bytes(&self.data_dir) {
            Ok(free) => free,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the data disk's free space");
                return;
            }
        };
        self.condition.send_if_modified(|condition| {
            match (condition.is_some(), free < MIN_FREE_BYTES) {
                (false, true) => {
                    let detail = format!(
                        "{} bytes free on the data disk ({}), under the {} the agent needs",
                        free,
                        self.data_dir.display(),
                        MIN_FREE_BYTES
                    );
                    tracing::error!(%detail, "the data disk is full");
                    *condition = Some(Condition {
                        code: Condition::DISK_FULL.to_string(),
                        detail,
                        since_ms: now_ms(),
                    });
                    true
                }
                (true, false) => {
                    tracing::info!(free, "the data disk has room again");
                    *condition = None;
                    true
                }
                _ => false,
            }
        });
    }

    /// Checks every `period` until the process ends.
    pub async fn run(self: std::sync::Arc<Self>, period: Duration) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.check();
        }
    }
}

/// Whether an I/O error means the disk has no room (`ENOSPC`, or a quota: `EDQUOT`).
pub fn is_no_space(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// Bytes an unprivileged process may still write on the file system holding `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("a NUL byte in the data dir's path"))?;
    // SAFETY: statvfs fills the zeroed struct it is given; `path` is NUL-terminated and lives
    // across the call.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_sets_the_condition_and_room_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let watch = DiskWatch::new(dir.path());
        let mut changes = watch.subscribe();
        // The test machine's disk has room.
        watch.check();
        assert!(!watch.is_full());
        assert!(!changes.has_changed().unwrap());

        watch.write_failed("outbox", &"database or disk is full");
        assert!(changes.has_changed().unwrap());
        let condition = changes.borrow_and_update().clone().unwrap();
        assert_eq!(condition.code, Condition::DISK_FULL);
        assert!(condition.detail.contains("outbox"), "{condition:?}");
        // A second failure changes nothing: the condition began with the first.
        watch.write_failed("outbox", &"again");
        assert!(!changes.has_changed().unwrap());

        // Room on the disk clears it.
        watch.check();
        assert!(changes.has_changed().unwrap());
        assert!(changes.borrow_and_update().is_none());
    }

    #[test]
    fn no_space_errors_are_told_apart() {
        assert!(is_no_space(&std::io::Error::from_raw_os_error(
            libc::ENOSPC
        )));
        assert!(is_no_space(&std::io::Error::from_raw_os_error(
            libc::EDQUOT
        )));
        assert!(!is_no_space(&std::io::Error::from_raw_os_error(libc::EIO)));
    }

    #[test]
    fn free_space_of_a_missing_dir_is_an_error() {
        assert!(free_bytes(Path::new("/nonexistent/driftgate")).is_err());
        assert!(free_bytes(Path::new("/")).is_ok());
    }
}
