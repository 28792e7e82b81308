//! Health: the device and the agent at one instant (CPU, memory, the data dir's disk,
//! temperatures, the agent's own RSS and uptime, link counters), as an outbox item.
//!
//! Read with sysinfo, refreshing only what a report needs: one CPU-usage refresh (the usage is
//! the average since the previous refresh, so a probe kept across intervals reports each
//! interval's average), memory, this one process, the disk list and the sensor list. On a
//! device without sensors the temperature map is simply empty.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fleet_protocol::outbox::Health;
use sysinfo::{
    Components, CpuRefreshKind, Disks, MemoryRefreshKind, Pid, ProcessRefreshKind,
    ProcessesToUpdate, RefreshKind, System,
};

use crate::link::LinkStats;

/// Takes health readings; keep one for the agent's life so CPU usage covers each interval.
pub struct HealthProbe {
    system: System,
    disks: Disks,
    components: Components,
    pid: Option<Pid>,
    data_dir: PathBuf,
    started: Instant,
}

impl HealthProbe {
    /// A probe for the disk that holds `data_dir`. The first CPU reading comes from the
    /// first [`HealthProbe::sample`] (usage since now).
    pub fn new(data_dir: &Path) -> Self {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        // Resolved once: the data dir exists by the time the agent runs, and a symlinked data
        // dir must be matched against the mount that really holds it.
        let data_dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        HealthProbe {
            system,
            disks: Disks::new_with_refreshed_list(),
            components: Components::new_with_refreshed_list(),
            pid: sysinfo::get_current_pid().ok(),
            data_dir,
            started: Instant::now(),
        }
    }

    /// Reads everything now. `link` supplies the link counters (connections, bytes, dropped
    /// messages by topic and reason).
    pub fn sample(&mut self, link: &LinkStats) -> Health {
        self.system.refresh_cpu_usage();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let agent_rss_bytes = match self.pid {
            Some(pid) => {
                self.system.refresh_processes_specifics(
                    ProcessesToUpdate::Some(&[pid]),
                    false,
                    ProcessRefreshKind::nothing().with_memory(),
                );
                self.system.process(pid).map_or(0, |p| p.memory())
            }
            None => 0,
        };
        // The mount list can change (a card inserted, a volume remounted): list again.
        self.disks.refresh(true);
        let (disk_free_bytes, disk_total_bytes) = self
            .disks
            .list()
            .iter()
            .filter(|disk| self.data_dir.starts_with(disk.mount_point()))
            .max_by_key(|disk| disk.mount_point().as_os_str().len())
            .map_or((0, 0), |disk| (disk.available_space(), disk.total_space()));
        self.components.refresh(true);
        let mut temperatures_c = BTreeMap::new();
        for component in self.components.list() {
            if let Some(t) = component.temperature().filter(|t| t.is_finite()) {
                temperatures_c.insert(component.label().to_string(), t);
            }
        }
        let cpu = self.system.global_cpu_usage();
        Health {
            cpu_percent: if cpu.is_finite() { cpu } else { 0.0 },
            mem_used_bytes: self.system.used_memory(),
            mem_total_bytes: self.system.total_memory(),
            disk_free_bytes,
            disk_total_bytes,
            temperatures_c,
            agent_rss_bytes,
            uptime_s: self.started.elapsed().as_secs(),
            link: link.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    #[cfg(target_os = "linux")]
    fn readings_are_plausible() {
        let dir = tempfile::tempdir().unwrap();
        let mut probe = HealthProbe::new(dir.path());
        let link = LinkStats::default();
        link.connects.fetch_add(3, Ordering::Relaxed);
        link.record_dropped("ack", "malformed");
        // Some work between the two CPU refreshes.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let health = probe.sample(&link);

        assert!((0.0..=100.0).contains(&health.cpu_percent), "{health:?}");
        assert!(health.mem_total_bytes > 0 && health.mem_used_bytes <= health.mem_total_bytes);
        assert!(
            health.disk_total_bytes > 0,
            "the tempdir's disk was found: {health:?}"
        );
        assert!(health.disk_free_bytes <= health.disk_total_bytes);
        // This test process has touched well over a megabyte.
        assert!(health.agent_rss_bytes > 1 << 20, "{health:?}");
        assert_eq!(health.link.connects, 3);
        assert_eq!(health.link.dropped.get("ack/malformed"), Some(&1));
        // It travels: the protocol accepts it.
        let item = fleet_protocol::outbox::ItemBody::Health(health);
        let json = serde_json::to_string(&item).unwrap();
        assert_eq!(
            serde_json::from_str::<fleet_protocol::outbox::ItemBody>(&json).unwrap(),
            item
        );
    }
}
