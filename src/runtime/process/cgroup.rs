//! Resource limits through cgroups, on whatever layout the host has: pure v2, pure v1, or the
//! hybrid layout (v1 controllers, a controller-less v2 tree) where only v1 can enforce limits.
//!
//! Each sandbox gets `<hierarchy>/<parent>/<sandbox id>` in every hierarchy used. A v2 directory
//! is kept even when it holds no controller, for `cgroup.kill` and `cgroup.freeze`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error(
        "no cgroup {0} controller is mounted (checked /proc/self/mountinfo); sandboxes cannot be limited"
    )]
    MissingController(&'static str),
    #[error("cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cgroup {0} still has processes after kill")]
    Busy(PathBuf),
}

impl From<CgroupError> for crate::runtime::RuntimeError {
    fn from(err: CgroupError) -> Self {
        crate::runtime::RuntimeError::Backend {
            runtime: "process",
            source: Box::new(err),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn memory_events_name(placement: &Placement) -> &'static str {
    match placement {
        Placement::V1(_) => "memory.oom_control",
        Placement::V2 => "memory.events",
    }
}

fn read_oom_kills(file: &Path) -> Option<u64> {
    crate::agent::oom::parse_oom_kills(&fs::read_to_string(file).ok()?)
}

/// OOM kills counted in the memory cgroup `<parent>/<id>` of whichever hierarchy holds the
/// memory controller here (for cgroups made by others, e.g. an OCI runtime). `None` when that
/// cgroup does not exist or counts nothing.
pub fn oom_kills_of(parent: &str, id: &str) -> Option<u64> {
    let mounts = mounts().ok()?;
    let v1 = mounts
        .iter()
        .find(|m| m.fstype == "cgroup" && m.options.split(',').any(|o| o == "memory"));
    let (root, placement) = match v1 {
        Some(m) => (m.point.clone(), Placement::V1(m.point.clone())),
        None => (
            mounts.iter().find(|m| m.fstype == "cgroup2")?.point.clone(),
            Placement::V2,
        ),
    };
    let file = root
        .join(parent.trim_matches('/'))
        .join(id)
        .join(memory_events_name(&placement));
    read_oom_kills(&file)
}

/// Limits applied to one sandbox.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
    pub cpu_millis: u64,
}

/// Where one controller lives.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Placement {
    /// A v1 hierarchy mounted at this path.
    V1(PathBuf),
    /// The v2 tree (controller enabled there).
    V2,
}

/// The host's cgroup layout, as found at start-up.
#[derive(Debug, Clone)]
pub struct Cgroups {
    parent: String,
    memory: Placement,
    pids: Placement,
    cpu: Option<Placement>,
    freezer_v1: Option<PathBuf>,
    /// Mount point of the v2 tree, if any.
    unified: Option<PathBuf>,
}

struct Mount {
    point: PathBuf,
    fstype: String,
    options: String,
}

fn mounts() -> io::Result<Vec<Mount>> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fstype = right.next()?.to_string();
            let options = right.nth(1).unwrap_or("").to_string();
            Some(Mount {
                point: PathBuf::from(point.replace("\\040", " ")),
                fstype,
                options,
            })
        })
        .collect())
}

impl Cgroups {
    /// Finds the controllers; memory and pids are required, cpu is optional (a warning).
    pub fn detect(parent: &str) -> Result<Self, CgroupError> {
        let mounts = mounts().map_err(io_err(Path::new("/proc/self/mountinfo")))?;
        let unified = mounts
            .iter()
            .find(|m| m.fstype == "cgroup2")
            .map(|m| m.point.clone());
        let v2_controllers = unified
            .as_ref()
            .and_then(|u| fs::read_to_string(u.join("cgroup.controllers")).ok())
            .unwrap_or_default();
        let v1 = |name: &str| {
            mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.options.split(',').any(|o| o == name))
                .map(|m| Placement::V1(m.point.clone()))
        };
        let place = |name: &str| {
            if v2_controllers.split_whitespace().any(|c| c == name) {
                Some(Placement::V2)
            } else {
                v1(name)
            }
        };
        let memory = place("memory").ok_or(CgroupError::MissingController("memory"))?;
        let pids = place("pids").ok_or(CgroupError::MissingController("pids"))?;
        let cpu = place("cpu");
        if cpu.is_none() {
            tracing::warn!("no cgroup cpu controller: sandbox CPU quotas will not be enforced");
        }
        let freezer_v1 = match v1("freezer") {
            Some(Placement::V1(p)) => Some(p),
            _ => None,
        };
        let this = Self {
            parent: parent.to_string(),
            memory,
            pids,
            cpu,
            freezer_v1,
            unified,
        };
        this.prepare_parents()?;
        Ok(this)
    }

    /// Describes the layout for the start-up log.
    pub fn describe(&self) -> String {
        let show = |p: &Placement| match p {
            Placement::V1(_) => "v1",
            Placement::V2 => "v2",
        };
        format!(
            "memory={} pids={} cpu={}",
            show(&self.memory),
            show(&self.pids),
            self.cpu.as_ref().map(show).unwrap_or("none")
        )
    }

    fn v2_controllers(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.memory == Placement::V2 {
            out.push("memory");
        }
        if self.pids == Placement::V2 {
            out.push("pids");
        }
        if self.cpu == Some(Placement::V2) {
            out.push("cpu");
        }
        out
    }

    /// Every directory a sandbox uses, deduplicated (v1 hierarchies may co-mount controllers).
    fn hierarchy_roots(&self) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = Vec::new();
        let mut push = |p: PathBuf| {
            if !roots.contains(&p) {
                roots.push(p);
            }
        };
        for placement in [Some(&self.memory), Some(&self.pids), self.cpu.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Placement::V1(p) = placement {
                push(p.clone());
            }
        }
        if let Some(f) = &self.freezer_v1 {
            push(f.clone());
        }
        // The v2 tree joins when it enforces something, or as the only freezer. On a hybrid
        // host it would only duplicate the v1 freezer, and moving a process into it is the
        // costliest step of a sandbox's creation.
        if let Some(u) = &self.unified
            && (!self.v2_controllers().is_empty() || self.freezer_v1.is_none())
        {
            push(u.clone());
        }
        roots
    }

    fn prepare_parents(&self) -> Result<(), CgroupError> {
        for root in self.hierarchy_roots() {
            let dir = root.join(&self.parent);
            if let Err(e) = fs::create_dir(&dir)
                && e.kind() != io::ErrorKind::AlreadyExists
            {
                return Err(io_err(&dir)(e));
            }
        }
        let controllers = self.v2_controllers();
        if let (Some(unified), false) = (&self.unified, controllers.is_empty()) {
            let enable: String = controllers.iter().map(|c| format!("+{c} ")).collect();
            for dir in [unified.clone(), unified.join(&self.parent)] {
                let file = dir.join("cgroup.subtree_control");
                fs::write(&file, enable.trim()).map_err(io_err(&file))?;
            }
        }
        // All sandboxes share one parent group, whose default weight is that of a single
        // process: give it the weight of every core, so sandboxes are not starved as a whole
        // by whatever else runs on the node.
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1);
        match &self.cpu {
            Some(Placement::V1(root)) => {
                let file = root.join(&self.parent).join("cpu.shares");
                fs::write(&file, (1024 * cores).to_string()).map_err(io_err(&file))?;
            }
            Some(Placement::V2) => {
                if let Some(unified) = &self.unified {
                    let file = unified.join(&self.parent).join("cpu.weight");
                    fs::write(&file, (100 * cores).min(10_000).to_string())
                        .map_err(io_err(&file))?;
                }
            }
            None => {}
        }
        Ok(())
    }

    fn dirs(&self, id: &str) -> Vec<PathBuf> {
        self.hierarchy_roots()
            .into_iter()
            .map(|root| root.join(&self.parent).join(id))
            .collect()
    }

    fn dir_for(&self, placement: &Placement, id: &str) -> Option<PathBuf> {
        match placement {
            Placement::V1(root) => Some(root.join(&self.parent).join(id)),
            Placement::V2 => self.unified.as_ref().map(|u| u.join(&self.parent).join(id)),
        }
    }

    /// Creates the sandbox's cgroups with their limits; returns the `cgroup.procs` files to join.
    pub fn create(&self, id: &str, limits: Limits) -> Result<Vec<PathBuf>, CgroupError> {
        let dirs = self.dirs(id);
        for dir in &dirs {
            fs::create_dir(dir).map_err(io_err(dir))?;
        }
        let write = |dir: PathBuf, file: &str, value: String| -> Result<(), CgroupError> {
            let path = dir.join(file);
            fs::write(&path, value).map_err(io_err(&path))
        };
        if let Some(dir) = self.dir_for(&self.memory, id) {
            match self.memory {
                Placement::V1(_) => {
                    write(
                        dir.clone(),
                        "memory.limit_in_bytes",
                        limits.memory_bytes.to_string(),
                    )?;
                    // Swap, where accounted, may not extend the limit.
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(
                            dir,
                            "memory.memsw.limit_in_bytes",
                            limits.memory_bytes.to_string(),
                        )?;
                    }
                }
                Placement::V2 => {
                    write(dir.clone(), "memory.max", limits.memory_bytes.to_string())?;
                    if dir.join("memory.swap.max").exists() {
                        write(dir, "memory.swap.max", "0".into())?;
                    }
                }
            }
        }
        if let Some(dir) = self.dir_for(&self.pids, id) {
            write(dir, "pids.max", limits.pids.to_string())?;
        }
        if let Some(cpu) = &self.cpu
            && let Some(dir) = self.dir_for(cpu, id)
        {
            let period = 100_000u64;
            let quota = (limits.cpu_millis.saturating_mul(period) / 1000).max(1000);
            match cpu {
                Placement::V1(_) => {
                    write(dir.clone(), "cpu.cfs_period_us", period.to_string())?;
                    write(dir, "cpu.cfs_quota_us", quota.to_string())?;
                }
                Placement::V2 => write(dir, "cpu.max", format!("{quota} {period}"))?,
            }
        }
        Ok(dirs.into_iter().map(|d| d.join("cgroup.procs")).collect())
    }

    /// The sandbox's memory counters file (it holds the `oom_kill` count).
    pub fn memory_events(&self, id: &str) -> Option<PathBuf> {
        let dir = self.dir_for(&self.memory, id)?;
        Some(dir.join(memory_events_name(&self.memory)))
    }

    /// How many processes the OOM killer has killed in the sandbox; `None` when unknown (the
    /// cgroup is gone, or the kernel does not count).
    pub fn oom_kills(&self, id: &str) -> Option<u64> {
        read_oom_kills(&self.memory_events(id)?)
    }

    /// Pids currently in the sandbox's cgroups.
    pub fn pids(&self, id: &str) -> Vec<i32> {
        let mut pids: Vec<i32> = Vec::new();
        for dir in self.dirs(id) {
            if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills every process of the sandbox and removes its cgroups.
    pub async fn remove(&self, id: &str) -> Result<(), CgroupError> {
        let dirs: Vec<PathBuf> = self.dirs(id).into_iter().filter(|d| d.exists()).collect();
        if dirs.is_empty() {
            return Ok(());
        }
        // Exits are asynchronous: retry with a short backoff, bounded to about two seconds.
        let mut delay = Duration::from_micros(200);
        for _ in 0..40 {
            self.kill_all(id);
            let mut busy = false;
            for dir in &dirs {
                match fs::remove_dir(dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(_) => busy = true,
                }
            }
            if !busy {
                return Ok(());
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(100));
        }
        Err(CgroupError::Busy(dirs[0].clone()))
    }

    fn kill_all(&self, id: &str) {
        if let Some(u) = &self.unified {
            let kill = u.join(&self.parent).join(id).join("cgroup.kill");
            if fs::write(&kill, "1").is_ok() {
                return;
            }
        }
        for pid in self.pids(id) {
            // SAFETY: kill(2) with a pid read from the sandbox's own cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// Freezes (`true`) or thaws the sandbox's processes, and waits until that took effect.
    pub async fn freeze(&self, id: &str, frozen: bool) -> Result<(), CgroupError> {
        let (file, value, state_file, done): (PathBuf, &str, PathBuf, &str) =
            match (&self.unified, &self.freezer_v1) {
                (Some(u), _) if u.join(&self.parent).join(id).join("cgroup.freeze").exists() => {
                    let dir = u.join(&self.parent).join(id);
                    (
                        dir.join("cgroup.freeze"),
                        if frozen { "1" } else { "0" },
                        dir.join("cgroup.events"),
                        if frozen { "frozen 1" } else { "frozen 0" },
                    )
                }
                (_, Some(f)) => {
                    let dir = f.join(&self.parent).join(id);
                    let value = if frozen { "FROZEN" } else { "THAWED" };
                    (
                        dir.join("freezer.state"),
                        value,
                        dir.join("freezer.state"),
                        value,
                    )
                }
                _ => return Err(CgroupError::MissingController("freezer")),
            };
        fs::write(&file, value).map_err(io_err(&file))?;
        // Freezing is asynchronous: wait (briefly, bounded) until every task has stopped.
        let mut delay = Duration::from_micros(100);
        for _ in 0..30 {
            let state = fs::read_to_string(&state_file).map_err(io_err(&state_file))?;
            if state.lines().any(|l| l.trim() == done) {
                return Ok(());
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(100));
        }
        Err(CgroupError::Busy(state_file))
    }
}
