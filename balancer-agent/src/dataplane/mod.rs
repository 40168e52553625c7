//! The kernel data path: loading and attaching the eBPF programs, and
//! writing the desired state into their maps.

pub mod pin;
pub mod plan;
mod query;

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, IterableMap, MapData, MapError, PerCpuArray, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkMsg, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use balancer_common::{
    AffinityKey, AffinityValue, Backend, BackendStats, BalancedSock, Config, Counter, MAX_BACKENDS,
    MAX_SERVICES, MAX_SLOTS, ServiceKey, ServiceState, ServiceValue, SlotKey, SpliceKey, map_names,
};
use serde::Serialize;

use crate::state::Frontend;
use plan::{Op, PlanError, Programmer, words_addr};

/// The eBPF object, built by aya-build from `balancer-ebpf` (see build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/balancer"));

/// Where a program attaches, and so where the kernel is asked whether it
/// is attached.
#[derive(Debug, Clone, Copy)]
enum Hook {
    /// A cgroup sock_addr program, at this `bpf_attach_type`.
    SockAddr(u32),
    /// The cgroup's sock_ops program.
    SockOps,
    /// An sk_msg program, on this sockhash.
    SkMsg(Sockhash),
}

/// The sockhashes sk_msg programs attach to.
#[derive(Debug, Clone, Copy)]
enum Sockhash {
    /// Filled by sock_ops.
    Socks,
    /// Filled by sock_ops and the router, only with --splice.
    Splice,
}

/// One program of the eBPF object and its attach point.
#[derive(Debug)]
struct Program {
    /// The function in `balancer-ebpf`; a cgroup program's link is pinned
    /// under this name.
    name: &'static str,
    /// As `status` shows it.
    attach_type: &'static str,
    hook: Hook,
}

/// Every program and where it attaches, in the order they are loaded.
const PROGRAMS: [Program; 7] = [
    Program {
        name: "balancer_connect4",
        attach_type: "connect4",
        hook: Hook::SockAddr(query::CGROUP_INET4_CONNECT),
    },
    Program {
        name: "balancer_connect6",
        attach_type: "connect6",
        hook: Hook::SockAddr(query::CGROUP_INET6_CONNECT),
    },
    Program {
        name: "balancer_getpeername4",
        attach_type: "getpeername4",
        hook: Hook::SockAddr(query::CGROUP_INET4_GETPEERNAME),
    },
    Program {
        name: "balancer_getpeername6",
        attach_type: "getpeername6",
        hook: Hook::SockAddr(query::CGROUP_INET6_GETPEERNAME),
    },
    Program {
        name: "balancer_sock_ops",
        attach_type: "sock_ops",
        hook: Hook::SockOps,
    },
    Program {
        name: "balancer_h2_streams",
        attach_type: "sk_msg",
        hook: Hook::SkMsg(Sockhash::Socks),
    },
    Program {
        name: "balancer_splice",
        attach_type: "sk_msg",
        hook: Hook::SkMsg(Sockhash::Splice),
    },
];

/// Maps only pinned by the agent: the router process opens them from the
/// pins.
const PIN_ONLY_MAPS: [&str; 3] = [
    map_names::ORIG_DST,
    map_names::ROUTER_LISTENERS,
    map_names::SERVED_NETNS,
];

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("cgroup {path} does not exist")]
    CgroupMissing { path: PathBuf },
    #[error("{path} is not a cgroup v2 directory (the programs attach to the unified hierarchy)")]
    NotCgroup2 { path: PathBuf },
    #[error("cannot open cgroup {path}: {source}")]
    CgroupOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object failed: {0}")]
    Object(#[source] aya::EbpfError),
    #[error(
        "the kernel refused program {program} ({source}); it needs Linux 5.10 or later with BTF, \
         CONFIG_CGROUP_BPF and sk_storage support, and CAP_BPF + CAP_NET_ADMIN"
    )]
    Load {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching {program} to cgroup {cgroup} failed: {source}")]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map}: duplicating its fd: {source}")]
    Dup {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Pin(#[from] pin::PinError),
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

struct Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, Backend>,
    stats: HashMap<MapData, u32, BackendStats>,
    service_state: Array<MapData, ServiceState>,
    counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, Config>,
    /// The routing table's seqlock (odd while a plan is being written).
    generation: Array<MapData, u64>,
    /// Kept open: the sk_msg programs are attached to them, and the
    /// kernel is asked about those programs through them.
    socks: SockHash<MapData, u64>,
    splice: SockHash<MapData, SpliceKey>,
    /// The kernel's alone (sessionAffinity); open to count its entries.
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    /// Balanced client sockets (sock_ops writes and deletes them), read
    /// to end those of a removed endpoint.
    balanced: HashMap<MapData, u64, BalancedSock>,
}

impl Maps {
    /// The maps the agent keeps open, each from `get`: taken from the
    /// loaded object (and pinned), or opened from an earlier agent's pins.
    fn build(
        mut get: impl FnMut(&'static str) -> Result<aya::maps::Map, DataplaneError>,
    ) -> Result<Self, DataplaneError> {
        fn open<T: TryFrom<aya::maps::Map, Error = MapError>>(
            get: &mut dyn FnMut(&'static str) -> Result<aya::maps::Map, DataplaneError>,
            name: &'static str,
        ) -> Result<T, DataplaneError> {
            T::try_from(get(name)?).map_err(map_err(name))
        }
        Ok(Self {
            services: open(&mut get, map_names::SERVICES)?,
            slots: open(&mut get, map_names::SLOTS)?,
            backends: open(&mut get, map_names::BACKENDS)?,
            stats: open(&mut get, map_names::BACKEND_STATS)?,
            service_state: open(&mut get, map_names::SERVICE_STATE)?,
            counters: open(&mut get, map_names::COUNTERS)?,
            config: open(&mut get, map_names::CONFIG)?,
            generation: open(&mut get, map_names::GENERATION)?,
            socks: open(&mut get, map_names::SOCKS)?,
            splice: open(&mut get, map_names::SPLICE)?,
            affinity: open(&mut get, map_names::AFFINITY)?,
            balanced: open(&mut get, map_names::BALANCED)?,
        })
    }

    fn sockhash(&self, s: Sockhash) -> &aya::maps::sock::SockMapFd {
        match s {
            Sockhash::Socks => self.socks.fd(),
            Sockhash::Splice => self.splice.fd(),
        }
    }
}

/// Remove every pin under `root` (`balancer-agent cleanup`), and return
/// once the cgroup programs those pins held are really detached.
///
/// Why wait: the kernel releases a link whose last reference went from a
/// workqueue, and only then takes its program off the cgroup; on a busy
/// node that took long enough for a `connect()` right after `cleanup` to
/// be balanced still. The link is invisible by id meanwhile (its count is
/// 0), so the cgroup itself is asked, for the program each link held.
pub fn cleanup(root: &Path) -> Result<Vec<PathBuf>, DataplaneError> {
    // (cgroup inode, attach type, program id) of every pinned cgroup link.
    let mut held = Vec::new();
    for (ino, name, path) in pin::pinned_links(root) {
        let Some(attach) = PROGRAMS
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| match p.hook {
                Hook::SockAddr(t) => Some(t),
                Hook::SockOps => Some(query::CGROUP_SOCK_OPS),
                Hook::SkMsg(_) => None,
            })
        else {
            continue;
        };
        if let Ok(info) = FdLink::from(PinnedLink::from_pin(&path).map_err(|e| {
            DataplaneError::Pin(pin::PinError::Bpffs {
                path: path.clone(),
                message: e.to_string(),
            })
        })?)
        .info()
        {
            held.push((ino, attach, info.program_id()));
        }
    }
    let removed = pin::cleanup(root)?;
    let cgroups = cgroups_by_inode(held.iter().map(|h| h.0).collect());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    for (ino, attach, prog) in held {
        let Some(cg) = cgroups.get(&ino) else {
            continue;
        };
        let Ok(dir) = File::open(cg) else {
            continue;
        };
        while query::attached(dir.as_fd(), attach).is_ok_and(|ids| ids.contains(&prog)) {
            if std::time::Instant::now() >= deadline {
                return Err(DataplaneError::Pin(pin::PinError::Bpffs {
                    path: cg.clone(),
                    message: format!(
                        "program {prog} is still attached 5 s after its link's pin was removed"
                    ),
                }));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    Ok(removed)
}

/// The cgroup v2 directories whose inodes are in `want`, found by walking
/// the hierarchy from its mount.
fn cgroups_by_inode(
    mut want: std::collections::BTreeSet<u64>,
) -> std::collections::BTreeMap<u64, PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut found = std::collections::BTreeMap::new();
    let Ok(root) = crate::node::cgroup2_root() else {
        return found;
    };
    let mut todo = vec![root];
    while let Some(dir) = todo.pop() {
        if want.is_empty() {
            break;
        }
        if let Ok(m) = std::fs::metadata(&dir)
            && want.remove(&m.ino())
        {
            found.insert(m.ino(), dir.clone());
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            todo.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    found
}

/// The program `name` of the object, as its program type `P`.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DataplaneError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DataplaneError::Load {
            program: name,
            source: ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| DataplaneError::Load {
            program: name,
            source,
        })
}

/// The cgroup the programs attach to, and where their links are pinned.
struct CgroupTarget<'a> {
    path: &'a Path,
    fd: &'a File,
    pin_dir: Option<&'a Path>,
}

/// Load a cgroup program, attach it to the cgroup, and pin its link when
/// pinning. One implementation per program type: aya gives each its own
/// `load`, `attach` and `take_link`, with no trait over them.
trait CgroupProgram {
    fn load_attach_pin(
        &mut self,
        name: &'static str,
        cgroup: &CgroupTarget<'_>,
    ) -> Result<Option<aya::programs::links::PinnedLink>, DataplaneError>;
}

macro_rules! cgroup_program {
    ($ty:ty) => {
        impl CgroupProgram for $ty {
            fn load_attach_pin(
                &mut self,
                name: &'static str,
                cgroup: &CgroupTarget<'_>,
            ) -> Result<Option<aya::programs::links::PinnedLink>, DataplaneError> {
                let attach_err = |source| DataplaneError::Attach {
                    program: name,
                    cgroup: cgroup.path.to_owned(),
                    source,
                };
                self.load().map_err(|source| DataplaneError::Load {
                    program: name,
                    source,
                })?;
                let link = self
                    .attach(cgroup.fd.as_fd(), CgroupAttachMode::Single)
                    .map_err(attach_err)?;
                let Some(dir) = cgroup.pin_dir else {
                    return Ok(None);
                };
                let link = self.take_link(link).map_err(attach_err)?;
                Ok(Some(pin::pin_link(dir, name, link)?))
            }
        }
    };
}
cgroup_program!(CgroupSockAddr);
cgroup_program!(SockOps);

/// Load an sk_msg program and attach it to the sockhash whose sockets it
/// handles (the map's pin keeps it attached).
fn attach_sk_msg(
    ebpf: &mut Ebpf,
    program_name: &'static str,
    map: &aya::maps::sock::SockMapFd,
    cgroup: &Path,
) -> Result<(), DataplaneError> {
    let sk_msg: &mut SkMsg = program(ebpf, program_name)?;
    sk_msg.load().map_err(|source| DataplaneError::Load {
        program: program_name,
        source,
    })?;
    sk_msg
        .attach(map)
        .map_err(|source| DataplaneError::Attach {
            program: program_name,
            cgroup: cgroup.to_owned(),
            source,
        })?;
    Ok(())
}

/// Reads BACKEND_STATS through a handle of its own (see
/// [`Dataplane::stats_reader`]).
pub struct StatsReader(HashMap<MapData, u32, BackendStats>);

impl StatsReader {
    pub fn get(&self, id: u32) -> BackendStats {
        self.0.get(&id, 0).unwrap_or_default()
    }
}

/// Counts AFFINITY's entries through a handle of its own (see
/// [`Dataplane::affinity_reader`]). The kernel alone writes that map, so
/// the agent has no record of its fill: each count walks its keys, a
/// syscall each, which must not hold the agent's lock.
pub struct AffinityReader(HashMap<MapData, AffinityKey, AffinityValue>);

impl AffinityReader {
    /// How full AFFINITY is now. The kernel changes it during the walk, so
    /// the count is approximate; the walk stops at its capacity.
    pub fn fill(&self) -> MapFill {
        let max_entries = self.0.map().info().map_or(0, |info| info.max_entries());
        MapFill {
            name: map_names::AFFINITY,
            entries: self
                .0
                .keys()
                .take(max_entries as usize)
                .take_while(Result::is_ok)
                .count(),
            max_entries,
        }
    }
}

/// A handle of its own on the hash map `map` (the same kernel map), made
/// into a `Map` by `kind`.
fn dup_hash<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
    kind: fn(MapData) -> aya::maps::Map,
) -> Result<HashMap<MapData, K, V>, DataplaneError> {
    let fd = map
        .map()
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| DataplaneError::Dup { map: name, source })?;
    let data = MapData::from_fd(fd).map_err(map_err(name))?;
    HashMap::try_from(kind(data)).map_err(map_err(name))
}

/// What the kernel says of one of the agent's programs.
#[derive(Debug, Clone)]
pub struct Attached {
    pub name: &'static str,
    pub attach_type: &'static str,
    /// The ids of the agent's own programs there (it attaches one); the
    /// error if the kernel could not be asked.
    pub ids: Result<Vec<u32>, String>,
    /// Other programs that run at the same hook for this cgroup (attached
    /// to it or to an ancestor): id, name, and whether it runs before the
    /// agent's.
    pub others: Vec<OtherProgram>,
}

/// A program of someone else's on one of the agent's hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherProgram {
    pub id: u32,
    pub name: String,
    /// It runs before the agent's program: on connect4/6 it may rewrite a
    /// VIP before the agent sees it (a CNI's socket load balancer).
    pub before: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: usize,
    pub max_entries: u32,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ApplySummary {
    pub ops: usize,
    pub frontends: usize,
}

pub struct Dataplane {
    /// Owns the programs and their links; dropping it detaches everything
    /// that is not pinned. None when an earlier agent's pins were adopted.
    _ebpf: Option<Ebpf>,
    /// Pinned links, kept so the pins are known to be ours.
    _pinned: Vec<aya::programs::links::PinnedLink>,
    /// The pin directory, when pinning.
    pub pin_dir: Option<PathBuf>,
    /// True when this agent adopted an earlier agent's pinned data path.
    pub adopted: bool,
    maps: Maps,
    cgroup: PathBuf,
    programmer: Programmer,
}

/// Checks that `path` is a cgroup v2 directory.
fn check_cgroup(path: &Path) -> Result<File, DataplaneError> {
    if !path.exists() {
        return Err(DataplaneError::CgroupMissing {
            path: path.to_owned(),
        });
    }
    if !path.join("cgroup.procs").exists() || !path.join("cgroup.controllers").exists() {
        return Err(DataplaneError::NotCgroup2 {
            path: path.to_owned(),
        });
    }
    File::open(path).map_err(|source| DataplaneError::CgroupOpen {
        path: path.to_owned(),
        source,
    })
}

impl Dataplane {
    /// Load the programs and attach them to `cgroup`. On any error, whatever
    /// was attached is detached again (the links drop with the object).
    pub fn attach(cgroup: &Path, pin_root: Option<&Path>) -> Result<Self, DataplaneError> {
        let cgroup_fd = check_cgroup(cgroup)?;
        let pin_dir = match pin_root {
            Some(root) => Some(pin::layout_dir(root, cgroup)?),
            None => None,
        };
        if let Some(dir) = &pin_dir
            && pin::is_pinned(dir)
        {
            return Self::adopt(cgroup, dir);
        }
        let mut pinned = Vec::new();
        let mut ebpf = EbpfLoader::new()
            .load(EBPF_OBJECT)
            .map_err(DataplaneError::Object)?;
        // The cgroup programs first; the sk_msg ones once their sockhashes
        // are taken from the object.
        let target = CgroupTarget {
            path: cgroup,
            fd: &cgroup_fd,
            pin_dir: pin_dir.as_deref(),
        };
        for p in &PROGRAMS {
            let link = match p.hook {
                Hook::SockAddr(_) => program::<CgroupSockAddr>(&mut ebpf, p.name)?
                    .load_attach_pin(p.name, &target)?,
                Hook::SockOps => {
                    program::<SockOps>(&mut ebpf, p.name)?.load_attach_pin(p.name, &target)?
                }
                Hook::SkMsg(_) => continue,
            };
            pinned.extend(link);
        }
        let mut take = |name: &'static str| -> Result<aya::maps::Map, DataplaneError> {
            let m = ebpf
                .take_map(name)
                .ok_or(DataplaneError::MissingMap(name))?;
            if let Some(dir) = &pin_dir {
                pin::pin_map(dir, name, &m)?;
            }
            Ok(m)
        };
        let maps = Maps::build(&mut take)?;
        for name in PIN_ONLY_MAPS {
            take(name)?;
        }
        for p in &PROGRAMS {
            if let Hook::SkMsg(s) = p.hook {
                attach_sk_msg(&mut ebpf, p.name, maps.sockhash(s), cgroup)?;
            }
        }
        if let Some(dir) = &pin_dir {
            pin::mark_complete(dir)?;
        }
        Ok(Self {
            _ebpf: Some(ebpf),
            _pinned: pinned,
            pin_dir,
            adopted: false,
            maps,
            cgroup: cgroup.to_owned(),
            programmer: Programmer::default(),
        })
    }

    /// Take over the data path an earlier agent pinned: its programs never
    /// stopped; open its maps and rebuild the record of what they hold, so
    /// the first update is a diff, not a rewrite.
    fn adopt(cgroup: &Path, dir: &Path) -> Result<Self, DataplaneError> {
        let maps = Maps::build(|name| Ok(pin::open_map(dir, name)?))?;
        let services: Vec<(ServiceKey, ServiceValue)> =
            maps.services.iter().filter_map(Result::ok).collect();
        let slots: Vec<(SlotKey, u32)> = maps.slots.iter().filter_map(Result::ok).collect();
        let backends: Vec<(u32, Backend)> = maps.backends.iter().filter_map(Result::ok).collect();
        let stats: Vec<u32> = maps.stats.keys().filter_map(Result::ok).collect();
        let programmer = Programmer::from_maps(&services, &slots, &backends, &stats);
        Ok(Self {
            _ebpf: None,
            _pinned: Vec::new(),
            pin_dir: Some(dir.to_owned()),
            adopted: true,
            maps,
            cgroup: cgroup.to_owned(),
            programmer,
        })
    }

    /// What the router process wrote to CONFIG: where it listens and
    /// when it last checked in. `None` before any router ran.
    pub fn router_config(&self) -> Option<Config> {
        self.maps
            .config
            .get(&0, 0)
            .ok()
            .filter(|c| c.router_port != 0)
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Each of the agent's programs, and what the kernel reports attached
    /// where it belongs (BPF_PROG_QUERY; the cgroup and the sockhashes).
    ///
    /// On the cgroup hooks the programs that run for the cgroup are asked
    /// in the order they run (its own and its ancestors'), and each is
    /// named, so that a program of someone else's (a CNI's socket load
    /// balancer, say) is listed, and one that runs before ours on
    /// connect4/6 is seen: it may rewrite a VIP before we see it.
    pub fn attached(&self) -> Vec<Attached> {
        let cgroup = File::open(&self.cgroup);
        let names: std::collections::HashMap<u32, String> = aya::programs::loaded_programs()
            .flatten()
            .map(|p| (p.id(), p.name_as_str().unwrap_or("").to_owned()))
            .collect();
        // Ours by id, not by name: another agent's programs have our names.
        let own = |name: &str| -> Option<u32> {
            if let Some(dir) = &self.pin_dir {
                let link: aya::programs::links::FdLink =
                    aya::programs::links::PinnedLink::from_pin(dir.join("links").join(name))
                        .ok()?
                        .into();
                return link.info().ok().map(|i| i.program_id());
            }
            self._ebpf
                .as_ref()?
                .program(name)?
                .info()
                .ok()
                .map(|i| i.id())
        };
        PROGRAMS
            .iter()
            .map(|p| {
                let on_cgroup = |attach_type| match &cgroup {
                    Ok(f) => query::effective(f.as_fd(), attach_type),
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                };
                let ids = match p.hook {
                    Hook::SockAddr(t) => on_cgroup(t),
                    Hook::SockOps => on_cgroup(query::CGROUP_SOCK_OPS),
                    Hook::SkMsg(s) => {
                        query::attached(self.maps.sockhash(s).as_fd(), query::SK_MSG_VERDICT)
                    }
                };
                let (ids, others) = match (ids, p.hook) {
                    (Ok(all), Hook::SockAddr(_) | Hook::SockOps) => {
                        let mine = own(p.name);
                        let name = |id: &u32| names.get(id).cloned().unwrap_or_default();
                        let first_ours = all.iter().position(|id| Some(*id) == mine);
                        let others = all
                            .iter()
                            .enumerate()
                            .filter(|(_, id)| Some(**id) != mine)
                            .map(|(i, id)| OtherProgram {
                                id: *id,
                                name: name(id),
                                before: first_ours.is_some_and(|o| i < o),
                            })
                            .collect();
                        let ours = all.iter().copied().filter(|id| Some(*id) == mine).collect();
                        (Ok(ours), others)
                    }
                    (Ok(all), Hook::SkMsg(_)) => (Ok(all), Vec::new()),
                    (Err(e), _) => (Err(e.to_string()), Vec::new()),
                };
                Attached {
                    name: p.name,
                    attach_type: p.attach_type,
                    ids,
                    others,
                }
            })
            .collect()
    }

    /// Publish `frontends`: plan every write first (nothing is written if
    /// they do not fit), then apply them in order.
    pub fn apply(&mut self, frontends: &[Frontend]) -> Result<ApplySummary, DataplaneError> {
        let (ops, next) = self.programmer.plan(frontends)?;
        if !ops.is_empty() {
            // The router process re-reads the table when the generation
            // moves, and not while it is odd (a plan half written).
            self.set_generation(true)?;
            let written = ops.iter().try_for_each(|op| self.write(op));
            self.set_generation(false)?;
            written?;
        }
        self.programmer.commit(next);
        self.collect_drained();
        Ok(ApplySummary {
            ops: ops.len(),
            frontends: frontends.len(),
        })
    }

    /// Step the seqlock to odd (`writing`) or to the next even value.
    fn set_generation(&mut self, writing: bool) -> Result<(), DataplaneError> {
        let g = self.maps.generation.get(&0, 0).unwrap_or(0);
        let next = if (g % 2 == 1) == writing {
            g + 2
        } else {
            g + 1
        };
        self.maps
            .generation
            .set(0, next, 0)
            .map_err(map_err(map_names::GENERATION))
    }

    /// The routing table's generation (even when complete).
    pub fn generation(&self) -> u64 {
        self.maps.generation.get(&0, 0).unwrap_or(0)
    }

    fn write(&mut self, op: &Op) -> Result<(), DataplaneError> {
        const BPF_ANY: u64 = 0;
        const BPF_NOEXIST: u64 = 1;
        let m = &mut self.maps;
        match op {
            Op::EnsureStats(id) => match m.stats.insert(id, BackendStats::default(), BPF_NOEXIST) {
                Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
                r => r,
            }
            .map_err(map_err(map_names::BACKEND_STATS)),
            Op::PutBackend(id, b) => m
                .backends
                .insert(id, b, BPF_ANY)
                .map_err(map_err(map_names::BACKENDS)),
            Op::PutSlot(k, id) => m
                .slots
                .insert(k, id, BPF_ANY)
                .map_err(map_err(map_names::SLOTS)),
            Op::PutService(k, v) => {
                // A new service id starts its round-robin cursor at 0.
                let _ = m.service_state.set(v.id, ServiceState::default(), BPF_ANY);
                m.services
                    .insert(k, v, BPF_ANY)
                    .map_err(map_err(map_names::SERVICES))
            }
            Op::DeleteSlot(k) => {
                ignore_missing(m.slots.remove(k)).map_err(map_err(map_names::SLOTS))
            }
            Op::DeleteService(k) => {
                ignore_missing(m.services.remove(k)).map_err(map_err(map_names::SERVICES))
            }
            Op::DeleteBackend(id) => {
                ignore_missing(m.backends.remove(id)).map_err(map_err(map_names::BACKENDS))
            }
        }
    }

    /// Delete the stats of removed backends whose last connection closed.
    pub fn collect_drained(&mut self) {
        let ids: Vec<u32> = self.programmer.draining.keys().copied().collect();
        for id in ids {
            let active = self.maps.stats.get(&id, 0).map(|s| s.active).unwrap_or(0);
            if active == 0 && self.programmer.finish_draining(id) {
                let _ = self.maps.stats.remove(&id);
            }
        }
    }

    pub fn backend_id(&self, addr: &SocketAddr) -> Option<u32> {
        self.programmer.backend_id(addr)
    }

    pub fn stats(&self, id: u32) -> BackendStats {
        self.maps.stats.get(&id, 0).unwrap_or_default()
    }

    /// Backends removed from the state that may still have open
    /// connections: their ids and addresses.
    pub fn draining_ids(&self) -> Vec<(u32, SocketAddr)> {
        self.programmer
            .draining
            .iter()
            .map(|(id, addr)| (*id, *addr))
            .collect()
    }

    /// A handle of its own on BACKEND_STATS (the same kernel map), so
    /// counts can be read without the agent: a scrape of 100k backends is
    /// 100k syscalls, which must not hold up updates.
    pub fn stats_reader(&self) -> Result<StatsReader, DataplaneError> {
        dup_hash(
            &self.maps.stats,
            map_names::BACKEND_STATS,
            aya::maps::Map::HashMap,
        )
        .map(StatsReader)
    }

    /// A handle of its own on AFFINITY, to count its entries without the
    /// agent.
    pub fn affinity_reader(&self) -> Result<AffinityReader, DataplaneError> {
        dup_hash(
            &self.maps.affinity,
            map_names::AFFINITY,
            aya::maps::Map::LruHashMap,
        )
        .map(AffinityReader)
    }

    /// How full the maps are, from the agent's record of what it wrote
    /// (walking 100k+ keys with a syscall each on every scrape blocked
    /// updates). AFFINITY, which only the kernel writes, is counted by an
    /// [`AffinityReader`] outside the agent's lock.
    pub fn map_fill(&self) -> Vec<MapFill> {
        let f = self.programmer.fill();
        vec![
            MapFill {
                name: map_names::SERVICES,
                entries: f.services,
                max_entries: MAX_SERVICES,
            },
            MapFill {
                name: map_names::SLOTS,
                entries: f.slots,
                max_entries: MAX_SLOTS,
            },
            MapFill {
                name: map_names::BACKENDS,
                entries: f.backends,
                max_entries: MAX_BACKENDS,
            },
            MapFill {
                name: map_names::BACKEND_STATS,
                entries: f.stats,
                max_entries: MAX_BACKENDS,
            },
        ]
    }

    /// The open balanced client sockets whose backend's address is in
    /// `gone`, by socket cookie (one walk of `BALANCED`).
    pub fn balanced_to(
        &self,
        gone: &std::collections::HashSet<IpAddr>,
    ) -> Vec<(u64, BalancedSock)> {
        self.balanced_where(|s| gone.contains(&words_addr(s.remote.addr)))
    }

    /// The open balanced client sockets `keep` selects (one walk of
    /// `BALANCED`).
    pub fn balanced_where(&self, keep: impl Fn(&BalancedSock) -> bool) -> Vec<(u64, BalancedSock)> {
        self.maps
            .balanced
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, s)| keep(s))
            .collect()
    }

    /// One decision counter, summed over CPUs.
    pub fn counter(&self, c: balancer_common::Counter) -> u64 {
        self.maps
            .counters
            .get(&(c as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// The data path's decision counters, summed over CPUs.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let i = c as u32;
                let total = self
                    .maps
                    .counters
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (c.name(), total)
            })
            .collect()
    }
}

fn is_errno(e: &MapError, errno: i32) -> bool {
    match e {
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(errno),
        MapError::KeyNotFound | MapError::ElementNotFound => errno == libc::ENOENT,
        _ => false,
    }
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(e) if is_errno(&e, libc::ENOENT) => Ok(()),
        r => r,
    }
}
