//! The sandbox's count of OOM kills, as its memory cgroup reports it (`oom_kill` in cgroup
//! v1's `memory.oom_control` or v2's `memory.events`). A command that died of SIGKILL while
//! the count rose was killed by the kernel's OOM killer, not by a person.
//!
//! The file is opened once: the process runtime hands the agent a descriptor (there is no
//! cgroup filesystem inside its sandboxes); in a container the agent finds its own cgroup
//! mounted under `/sys/fs/cgroup`. Without either, no command is ever reported OOM-killed.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

/// Where a container's own memory cgroup shows its counters (v1, then v2).
const CONTAINER_FILES: &[&str] = &[
    "/sys/fs/cgroup/memory/memory.oom_control",
    "/sys/fs/cgroup/memory.events",
];

#[derive(Default)]
pub struct OomCounter {
    file: Option<File>,
}

impl OomCounter {
    /// From the descriptor the runtime passed, else from the container's cgroup mount.
    pub fn open(fd: Option<i32>) -> Self {
        let file = match fd {
            // SAFETY: the runtime handed us this descriptor for exactly this use.
            Some(fd) => Some(unsafe { File::from_raw_fd(fd) }),
            None => CONTAINER_FILES.iter().find_map(|p| File::open(p).ok()),
        };
        let counter = Self { file };
        // A file that does not read as a counter is no counter.
        if counter.count().is_none() {
            return Self::default();
        }
        counter
    }

    /// OOM kills in the sandbox's memory cgroup so far; `None` when unknown.
    pub fn count(&self) -> Option<u64> {
        let file = self.file.as_ref()?;
        let mut buf = [0u8; 512];
        // Reading at offset 0 makes the kernel render the counters afresh.
        let n = file.read_at(&mut buf, 0).ok()?;
        parse_oom_kills(std::str::from_utf8(&buf[..n]).ok()?)
    }
}

/// The `oom_kill N` line of a cgroup memory counter file.
pub fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::parse_oom_kills;

    #[test]
    fn both_cgroup_versions_counters_parse() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(v1), Some(3));
        assert_eq!(parse_oom_kills(v2), Some(2));
        assert_eq!(parse_oom_kills("oom_kill_disable 0\nunder_oom 0\n"), None);
    }
}
