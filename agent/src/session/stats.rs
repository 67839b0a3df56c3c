//! The agent's own resource use for `Heartbeat.stats`: RSS from `/proc/self/statm` and CPU
//! from `/proc/self/stat`, as a percentage of one core since the previous sample. Reading two
//! small procfs files once per heartbeat is cheaper than any sampling thread.

use std::path::Path;
use std::time::Instant;

use dr_proto::pb;
use nix::unistd::{SysconfVar, sysconf};

pub struct StatsSampler {
    page_size: u64,
    ticks_per_sec: f64,
    last: Option<(Instant, u64)>,
}

impl Default for StatsSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl StatsSampler {
    pub fn new() -> Self {
        let page_size = sysconf(SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(4096);
        let ticks = sysconf(SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
        Self {
            page_size,
            ticks_per_sec: ticks,
            last: None,
        }
    }

    /// One sample; `disk_path` names the filesystem whose free space is reported.
    pub fn sample(&mut self, disk_path: &Path) -> pb::HostStats {
        let rss_bytes = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| {
                s.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .map_or(0, |pages| pages * self.page_size);
        let now = Instant::now();
        let cpu_percent = match (cpu_ticks(), self.last) {
            (Some(ticks), Some((then, last_ticks))) => {
                self.last = Some((now, ticks));
                let wall = now.duration_since(then).as_secs_f64();
                if wall > 0.0 {
                    (ticks.saturating_sub(last_ticks) as f64 / self.ticks_per_sec) / wall * 100.0
                } else {
                    0.0
                }
            }
            (Some(ticks), None) => {
                self.last = Some((now, ticks));
                0.0
            }
            (None, _) => 0.0,
        };
        let disk_free_bytes =
            crate::health::disk::free_space(disk_path).map_or(0, |(free, _)| free);
        pb::HostStats {
            rss_bytes,
            cpu_percent,
            disk_free_bytes,
        }
    }
}

/// utime + stime of this process, in clock ticks.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; fields after its closing paren are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_rss_and_cpu() {
        let mut s = StatsSampler::new();
        let a = s.sample(Path::new("/"));
        assert!(a.rss_bytes > 1024 * 1024, "{a:?}");
        assert!(a.disk_free_bytes > 0);
        assert!(cpu_ticks().is_some());
        let b = s.sample(Path::new("/"));
        assert!(b.cpu_percent >= 0.0);
    }
}
