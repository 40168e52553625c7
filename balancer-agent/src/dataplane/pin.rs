//! Pins in bpffs: the maps and links outlive the agent, so a restart
//! (including after `kill -9`) or an upgrade adopts a data path that never
//! stopped.
//!
//! Layout: `<bpffs root>/v6/cg-<cgroup inode>/{maps,links}/<name>` and a
//! `complete` marker written last; `v6` is the map layout version (a
//! layout change gets a new directory, never a misread map; v2 added
//! `SPLICE` and three counters, v3 `GENERATION` and `AFFINITY` pinned, for
//! the router process, which reads the data path from these pins; v4
//! `BackendStats::connect_failures` and a counter; v5 `SERVED_NETNS`,
//! `OrigDst::netns_cookie`, `Config::identity`, `BackendStats::failed_at_ns`
//! and two counters; v6 `BALANCED` and a counter).

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData},
    programs::links::{FdLink, PinnedLink},
};

pub const LAYOUT: &str = "v6";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("bpffs at {path}: {message}")]
    Bpffs { path: PathBuf, message: String },
    #[error("pinning {what} at {path}: {message}")]
    Pin {
        what: String,
        path: PathBuf,
        message: String,
    },
    #[error("opening pinned map {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error(
        "{found} holds a data path pinned by an agent with another map layout, still attached \
         to this cgroup; this agent ({LAYOUT}) cannot adopt it: run `balancer-agent cleanup` \
         (which detaches it) and start again"
    )]
    OtherLayout { found: PathBuf },
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Make sure `root` is on a bpffs, mounting one where needed: on the
/// nearest existing ancestor of `root` if that is an empty directory that
/// is not a bpffs yet (`/sys/fs/bpf` on hosts that do not mount it).
pub fn ensure_bpffs(root: &Path) -> Result<(), PinError> {
    let err = |message: String| PinError::Bpffs {
        path: root.to_owned(),
        message,
    };
    let mut anc = root.to_path_buf();
    while !anc.exists() {
        if !anc.pop() {
            return Err(err("no existing ancestor".into()));
        }
    }
    if !is_bpffs(&anc) {
        let empty = std::fs::read_dir(&anc)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(err(format!(
                "{} is not a bpffs and not an empty directory to mount one on",
                anc.display()
            )));
        }
        nix::mount::mount(
            Some("bpf"),
            &anc,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| err(format!("mount -t bpf on {}: {e}", anc.display())))?;
        tracing::info!(path = %anc.display(), "mounted bpffs");
    }
    std::fs::create_dir_all(root).map_err(|e| err(e.to_string()))
}

/// Where this layout's pins for `cgroup` are, without creating anything
/// (the router process waits for the agent to pin them).
pub fn dir_of(root: &Path, cgroup: &Path) -> Result<PathBuf, PinError> {
    let ino = std::fs::metadata(cgroup)
        .map(|m| m.ino())
        .map_err(|e| PinError::Bpffs {
            path: cgroup.to_owned(),
            message: e.to_string(),
        })?;
    Ok(root.join(LAYOUT).join(format!("cg-{ino}")))
}

/// The pin directory of this layout and cgroup.
pub fn layout_dir(root: &Path, cgroup: &Path) -> Result<PathBuf, PinError> {
    ensure_bpffs(root)?;
    let dir = dir_of(root, cgroup)?;
    let cg = dir.file_name().unwrap_or_default();
    // Another layout's complete pinning for this cgroup keeps its programs
    // attached: attaching ours would fail with a bare EEXIST.
    if let Ok(layouts) = std::fs::read_dir(root) {
        for l in layouts.flatten() {
            let other = l.path().join(cg);
            if l.file_name() != LAYOUT && is_pinned(&other) {
                return Err(PinError::OtherLayout { found: other });
            }
        }
    }
    for sub in ["maps", "links"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| PinError::Bpffs {
            path: dir.clone(),
            message: e.to_string(),
        })?;
    }
    Ok(dir)
}

/// A complete earlier pinning (the marker is written last).
pub fn is_pinned(dir: &Path) -> bool {
    dir.join("complete").exists()
}

pub fn mark_complete(dir: &Path) -> Result<(), PinError> {
    // bpffs allows directories only; the marker is a directory.
    std::fs::create_dir_all(dir.join("complete")).map_err(|e| PinError::Pin {
        what: "completion marker".into(),
        path: dir.to_owned(),
        message: e.to_string(),
    })
}

pub fn pin_map(dir: &Path, name: &str, map: &Map) -> Result<(), PinError> {
    let path = dir.join("maps").join(name);
    let _ = std::fs::remove_file(&path);
    map.pin(&path).map_err(|e| PinError::Pin {
        what: format!("map {name}"),
        path,
        message: e.to_string(),
    })
}

pub fn pin_link<L>(dir: &Path, name: &str, link: L) -> Result<PinnedLink, PinError>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: std::fmt::Display,
{
    let path = dir.join("links").join(name);
    let _ = std::fs::remove_file(&path);
    let fd = FdLink::try_from(link).map_err(|e| PinError::Pin {
        what: format!("link of {name}"),
        path: path.clone(),
        message: e.to_string(),
    })?;
    fd.pin(&path).map_err(|e| PinError::Pin {
        what: format!("link of {name}"),
        path,
        message: e.to_string(),
    })
}

pub fn open_map(dir: &Path, name: &str) -> Result<Map, PinError> {
    let path = dir.join("maps").join(name);
    let data = MapData::from_pin(&path).map_err(|e| PinError::Open {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Map::from_map_data(data).map_err(|e| PinError::Open {
        path,
        message: e.to_string(),
    })
}

/// Every pinned link under `root`, of every layout: (cgroup inode, link
/// name, path), from `<layout>/cg-<ino>/links/<name>`.
pub fn pinned_links(root: &Path) -> Vec<(u64, String, PathBuf)> {
    let mut out = Vec::new();
    let dirs = |p: &Path| -> Vec<std::fs::DirEntry> {
        std::fs::read_dir(p)
            .map(|d| d.flatten().collect())
            .unwrap_or_default()
    };
    for layout in dirs(root) {
        for cg in dirs(&layout.path()) {
            let name = cg.file_name().to_string_lossy().into_owned();
            let Some(ino) = name.strip_prefix("cg-").and_then(|i| i.parse().ok()) else {
                continue;
            };
            for link in dirs(&cg.path().join("links")) {
                out.push((
                    ino,
                    link.file_name().to_string_lossy().into_owned(),
                    link.path(),
                ));
            }
        }
    }
    out
}

/// Remove every pin under `root` (all layouts and cgroups): unpinned links
/// detach their programs, unpinned maps are freed.
pub fn cleanup(root: &Path) -> Result<Vec<PathBuf>, PinError> {
    let mut removed = Vec::new();
    if !root.exists() {
        return Ok(removed);
    }
    let err = |e: std::io::Error| PinError::Bpffs {
        path: root.to_owned(),
        message: e.to_string(),
    };
    for entry in std::fs::read_dir(root).map_err(err)? {
        let entry = entry.map_err(err)?;
        // Layouts are directories; the kernel puts files of its own
        // (`maps.debug`, `progs.debug`) at the root of every bpffs.
        if !entry.file_type().map_err(err)?.is_dir() {
            continue;
        }
        let layout = entry.path();
        removed.push(layout.clone());
        std::fs::remove_dir_all(&layout).map_err(err)?;
    }
    Ok(removed)
}
