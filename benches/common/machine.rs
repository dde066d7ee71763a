//! The machine a bench ran on, and the header every bench prints.

use super::*;

/// One line per fact: CPU count and model, kernel, memory, date.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem_gib = meminfo_kib("MemTotal") as f64 / (1024.0 * 1024.0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "machine: nproc={nproc}, cpu=\"{model}\", kernel={}, memory={mem_gib:.1} GiB, date={}, loadavg={}",
        kernel.trim(),
        utc_now(),
        load.join(" ")
    )
}

pub fn print_header(bench: &str) {
    println!("=== arl bench: {bench} ===");
    println!("{}", machine());
}

/// The current UTC time as `YYYY-MM-DD HH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The number of a `Field: N kB` line of a /proc file (meminfo, status, smaps_rollup).
fn proc_kib(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// A field of /proc/meminfo in KiB.
pub fn meminfo_kib(field: &str) -> u64 {
    proc_kib("/proc/meminfo", field).unwrap_or(0)
}

/// A `Vm*` / `Rss*` field of /proc/PID/status in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    proc_kib(&format!("/proc/{pid}/status"), field).unwrap_or(0)
}

/// A field of /proc/PID/smaps_rollup in KiB (e.g. "Pss", "Rss").
pub fn smaps_rollup_kib(pid: u32, field: &str) -> Option<u64> {
    proc_kib(&format!("/proc/{pid}/smaps_rollup"), field)
}

/// Pids whose parent is `ppid` (from /proc/*/stat).
pub fn children_of(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name may contain spaces: fields start after the last ')'.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = after.split_whitespace();
        let _state = fields.next();
        if fields.next().and_then(|p| p.parse::<u32>().ok()) == Some(ppid) {
            out.push(pid);
        }
    }
    out
}

/// Removes `arl-bench-<pid>` cgroup parents of benches that are no longer running: the
/// kernel can refuse to remove a just-emptied cgroup for a few seconds on a busy machine, so
/// the bench that made it may have had to leave it behind.
pub fn remove_stale_cgroup_parents() {
    for root in cgroup_roots() {
        let Ok(entries) = std::fs::read_dir(&root) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("arl-bench-")
                .and_then(|p| p.split('-').next()?.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                // Only empty cgroups can be removed; a non-empty one stays.
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

/// CPU time of a process in seconds: (own user+system, reaped children's user+system).
pub fn cpu_seconds(pid: u32) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return (0.0, 0.0);
    };
    // After the name: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17).
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ((tick(14) + tick(15)) / hz, (tick(16) + tick(17)) / hz)
}

/// Total CPU seconds (own + reaped children) of a set of processes.
pub fn cpu_total(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|&p| {
            let (own, kids) = cpu_seconds(p);
            own + kids
        })
        .sum()
}
