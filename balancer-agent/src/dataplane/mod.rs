//! The kernel data path: loading and attaching the eBPF programs, and
//! writing the desired state into their maps.

pub mod pin;
pub mod plan;
mod query;

use std::{
    fs::File,
    net::SocketAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, IterableMap, MapData, MapError, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SkMsg, SockOps},
};
use balancer_common::{
    Backend, BackendStats, Config, Counter, MAX_BACKENDS, MAX_SERVICES, MAX_SLOTS, ServiceKey,
    ServiceState, ServiceValue, SlotKey, SpliceKey, map_names,
};
use serde::Serialize;

use crate::state::Frontend;
use plan::{Op, PlanError, Programmer};

/// The eBPF object, built by aya-build from `balancer-ebpf` (see build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/balancer"));

/// Programs and where they attach. The names are the functions in
/// `balancer-ebpf/src/programs.rs`.
const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    "balancer_connect4",
    "balancer_connect6",
    "balancer_getpeername4",
    "balancer_getpeername6",
];
const SOCK_OPS_PROGRAM: &str = "balancer_sock_ops";
const SK_MSG_PROGRAM: &str = "balancer_h2_streams";
const SPLICE_PROGRAM: &str = "balancer_splice";

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
    /// Kept open: the sk_msg program is attached to it.
    _socks: SockHash<MapData, u64>,
}

/// Attach an sk_msg program to the sockhash whose sockets it handles.
fn attach_sk_msg(
    ebpf: &mut Ebpf,
    program: &'static str,
    map: &aya::maps::sock::SockMapFd,
    cgroup: &Path,
) -> Result<(), DataplaneError> {
    let sk_msg: &mut SkMsg = ebpf
        .program_mut(program)
        .ok_or(DataplaneError::Load {
            program,
            source: ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| DataplaneError::Load { program, source })?;
    sk_msg
        .load()
        .map_err(|source| DataplaneError::Load { program, source })?;
    sk_msg
        .attach(map)
        .map_err(|source| DataplaneError::Attach {
            program,
            cgroup: cgroup.to_owned(),
            source,
        })?;
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct ProgramStatus {
    pub name: &'static str,
    pub attach_type: &'static str,
    /// Where the kernel is asked whether it is attached.
    #[serde(skip)]
    target: Target,
}

/// Where a program attaches: the cgroup at an attach type, or a sockhash.
#[derive(Debug, Clone, Copy)]
enum Target {
    Cgroup(u32),
    Socks,
    Splice,
}

/// Reads BACKEND_STATS through a handle of its own (see
/// [`Dataplane::stats_reader`]).
pub struct StatsReader(HashMap<MapData, u32, BackendStats>);

impl StatsReader {
    pub fn get(&self, id: u32) -> BackendStats {
        self.0.get(&id, 0).unwrap_or_default()
    }
}

/// What the kernel says of one of the agent's programs.
#[derive(Debug, Clone)]
pub struct Attached {
    pub name: &'static str,
    pub attach_type: &'static str,
    /// The ids of the programs attached there (the agent attaches one);
    /// the error if the kernel could not be asked.
    pub ids: Result<Vec<u32>, String>,
}

fn sock_addr_target(name: &str) -> Target {
    Target::Cgroup(match name.trim_start_matches("balancer_") {
        "connect4" => query::CGROUP_INET4_CONNECT,
        "connect6" => query::CGROUP_INET6_CONNECT,
        "getpeername4" => query::CGROUP_INET4_GETPEERNAME,
        _ => query::CGROUP_INET6_GETPEERNAME,
    })
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
    programs: Vec<ProgramStatus>,
    programmer: Programmer,
    /// The SPLICE map's fd, kept to ask the kernel about its program.
    splice_fd: Option<std::os::fd::OwnedFd>,
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
        let mut programs = Vec::new();
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::Load {
                    program: name,
                    source: ProgramError::UnexpectedProgramType,
                })?
                .try_into()
                .map_err(|source| DataplaneError::Load {
                    program: name,
                    source,
                })?;
            prog.load().map_err(|source| DataplaneError::Load {
                program: name,
                source,
            })?;
            let link = prog
                .attach(cgroup_fd.as_fd(), CgroupAttachMode::Single)
                .map_err(|source| DataplaneError::Attach {
                    program: name,
                    cgroup: cgroup.to_owned(),
                    source,
                })?;
            if let Some(dir) = &pin_dir {
                let link = prog
                    .take_link(link)
                    .map_err(|source| DataplaneError::Attach {
                        program: name,
                        cgroup: cgroup.to_owned(),
                        source,
                    })?;
                pinned.push(pin::pin_link(dir, name, link)?);
            }
            programs.push(ProgramStatus {
                name,
                attach_type: name.trim_start_matches("balancer_"),
                target: sock_addr_target(name),
            });
        }
        let sock_ops: &mut SockOps = ebpf
            .program_mut(SOCK_OPS_PROGRAM)
            .ok_or(DataplaneError::Load {
                program: SOCK_OPS_PROGRAM,
                source: ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(|source| DataplaneError::Load {
                program: SOCK_OPS_PROGRAM,
                source,
            })?;
        sock_ops.load().map_err(|source| DataplaneError::Load {
            program: SOCK_OPS_PROGRAM,
            source,
        })?;
        let link = sock_ops
            .attach(cgroup_fd.as_fd(), CgroupAttachMode::Single)
            .map_err(|source| DataplaneError::Attach {
                program: SOCK_OPS_PROGRAM,
                cgroup: cgroup.to_owned(),
                source,
            })?;
        if let Some(dir) = &pin_dir {
            let link = sock_ops
                .take_link(link)
                .map_err(|source| DataplaneError::Attach {
                    program: SOCK_OPS_PROGRAM,
                    cgroup: cgroup.to_owned(),
                    source,
                })?;
            pinned.push(pin::pin_link(dir, SOCK_OPS_PROGRAM, link)?);
        }
        programs.push(ProgramStatus {
            name: SOCK_OPS_PROGRAM,
            attach_type: "sock_ops",
            target: Target::Cgroup(query::CGROUP_SOCK_OPS),
        });

        // sk_msg on the SOCKS sockhash (sock_ops fills it).
        let socks_map = ebpf
            .take_map(map_names::SOCKS)
            .ok_or(DataplaneError::MissingMap(map_names::SOCKS))?;
        if let Some(dir) = &pin_dir {
            pin::pin_map(dir, map_names::SOCKS, &socks_map)?;
        }
        let socks: SockHash<MapData, u64> =
            SockHash::try_from(socks_map).map_err(map_err(map_names::SOCKS))?;
        attach_sk_msg(&mut ebpf, SK_MSG_PROGRAM, socks.fd(), cgroup)?;
        programs.push(ProgramStatus {
            name: SK_MSG_PROGRAM,
            attach_type: "sk_msg",
            target: Target::Socks,
        });
        // sk_msg on the SPLICE sockhash (sock_ops and the router fill it,
        // only with --splice).
        let splice_map = ebpf
            .take_map(map_names::SPLICE)
            .ok_or(DataplaneError::MissingMap(map_names::SPLICE))?;
        if let Some(dir) = &pin_dir {
            pin::pin_map(dir, map_names::SPLICE, &splice_map)?;
        }
        let splice: SockHash<MapData, SpliceKey> =
            SockHash::try_from(splice_map).map_err(map_err(map_names::SPLICE))?;
        attach_sk_msg(&mut ebpf, SPLICE_PROGRAM, splice.fd(), cgroup)?;
        programs.push(ProgramStatus {
            name: SPLICE_PROGRAM,
            attach_type: "sk_msg",
            target: Target::Splice,
        });

        let mut take = |name: &'static str| -> Result<aya::maps::Map, DataplaneError> {
            let m = ebpf
                .take_map(name)
                .ok_or(DataplaneError::MissingMap(name))?;
            if let Some(dir) = &pin_dir {
                pin::pin_map(dir, name, &m)?;
            }
            Ok(m)
        };
        let maps = Maps {
            services: HashMap::try_from(take(map_names::SERVICES)?)
                .map_err(map_err(map_names::SERVICES))?,
            slots: HashMap::try_from(take(map_names::SLOTS)?).map_err(map_err(map_names::SLOTS))?,
            backends: HashMap::try_from(take(map_names::BACKENDS)?)
                .map_err(map_err(map_names::BACKENDS))?,
            stats: HashMap::try_from(take(map_names::BACKEND_STATS)?)
                .map_err(map_err(map_names::BACKEND_STATS))?,
            service_state: Array::try_from(take(map_names::SERVICE_STATE)?)
                .map_err(map_err(map_names::SERVICE_STATE))?,
            counters: PerCpuArray::try_from(take(map_names::COUNTERS)?)
                .map_err(map_err(map_names::COUNTERS))?,
            config: Array::try_from(take(map_names::CONFIG)?)
                .map_err(map_err(map_names::CONFIG))?,
            generation: Array::try_from(take(map_names::GENERATION)?)
                .map_err(map_err(map_names::GENERATION))?,
            _socks: socks,
        };
        // The router process opens ORIG_DST and ROUTER_LISTENERS (and
        // AFFINITY is the kernel's alone) from the pins; only pinned here.
        take(map_names::ORIG_DST)?;
        take(map_names::AFFINITY)?;
        take(map_names::ROUTER_LISTENERS)?;
        if let Some(dir) = &pin_dir {
            pin::mark_complete(dir)?;
        }
        Ok(Self {
            splice_fd: splice.fd().as_fd().try_clone_to_owned().ok(),
            _ebpf: Some(ebpf),
            _pinned: pinned,
            pin_dir,
            adopted: false,
            maps,
            cgroup: cgroup.to_owned(),
            programs,
            programmer: Programmer::default(),
        })
    }

    /// Take over the data path an earlier agent pinned: its programs never
    /// stopped; open its maps and rebuild the record of what they hold, so
    /// the first update is a diff, not a rewrite.
    fn adopt(cgroup: &Path, dir: &Path) -> Result<Self, DataplaneError> {
        let open = |name: &'static str| pin::open_map(dir, name);
        let maps = Maps {
            services: HashMap::try_from(open(map_names::SERVICES)?)
                .map_err(map_err(map_names::SERVICES))?,
            slots: HashMap::try_from(open(map_names::SLOTS)?).map_err(map_err(map_names::SLOTS))?,
            backends: HashMap::try_from(open(map_names::BACKENDS)?)
                .map_err(map_err(map_names::BACKENDS))?,
            stats: HashMap::try_from(open(map_names::BACKEND_STATS)?)
                .map_err(map_err(map_names::BACKEND_STATS))?,
            service_state: Array::try_from(open(map_names::SERVICE_STATE)?)
                .map_err(map_err(map_names::SERVICE_STATE))?,
            counters: PerCpuArray::try_from(open(map_names::COUNTERS)?)
                .map_err(map_err(map_names::COUNTERS))?,
            config: Array::try_from(open(map_names::CONFIG)?)
                .map_err(map_err(map_names::CONFIG))?,
            generation: Array::try_from(open(map_names::GENERATION)?)
                .map_err(map_err(map_names::GENERATION))?,
            _socks: SockHash::try_from(open(map_names::SOCKS)?)
                .map_err(map_err(map_names::SOCKS))?,
        };
        let services: Vec<(ServiceKey, ServiceValue)> =
            maps.services.iter().filter_map(Result::ok).collect();
        let slots: Vec<(SlotKey, u32)> = maps.slots.iter().filter_map(Result::ok).collect();
        let backends: Vec<(u32, Backend)> = maps.backends.iter().filter_map(Result::ok).collect();
        let stats: Vec<u32> = maps.stats.keys().filter_map(Result::ok).collect();
        let programmer = Programmer::from_maps(&services, &slots, &backends, &stats);
        let mut programs: Vec<ProgramStatus> = SOCK_ADDR_PROGRAMS
            .iter()
            .map(|name| ProgramStatus {
                name,
                attach_type: name.trim_start_matches("balancer_"),
                target: sock_addr_target(name),
            })
            .collect();
        programs.push(ProgramStatus {
            name: SOCK_OPS_PROGRAM,
            attach_type: "sock_ops",
            target: Target::Cgroup(query::CGROUP_SOCK_OPS),
        });
        programs.push(ProgramStatus {
            name: SK_MSG_PROGRAM,
            attach_type: "sk_msg",
            target: Target::Socks,
        });
        programs.push(ProgramStatus {
            name: SPLICE_PROGRAM,
            attach_type: "sk_msg",
            target: Target::Splice,
        });
        let splice: SockHash<MapData, SpliceKey> =
            SockHash::try_from(open(map_names::SPLICE)?).map_err(map_err(map_names::SPLICE))?;
        let splice_fd = splice.fd().as_fd().try_clone_to_owned().ok();
        Ok(Self {
            splice_fd,
            _ebpf: None,
            _pinned: Vec::new(),
            pin_dir: Some(dir.to_owned()),
            adopted: true,
            maps,
            cgroup: cgroup.to_owned(),
            programs,
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
    pub fn attached(&self) -> Vec<Attached> {
        let cgroup = File::open(&self.cgroup);
        self.programs
            .iter()
            .map(|p| {
                let ids = match p.target {
                    Target::Cgroup(t) => match &cgroup {
                        Ok(f) => query::attached(f.as_fd(), t),
                        Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                    },
                    Target::Socks => {
                        query::attached(self.maps._socks.fd().as_fd(), query::SK_MSG_VERDICT)
                    }
                    Target::Splice => match &self.splice_fd {
                        Some(fd) => query::attached(fd.as_fd(), query::SK_MSG_VERDICT),
                        None => Err(std::io::Error::other("the SPLICE map is not open")),
                    },
                };
                Attached {
                    name: p.name,
                    attach_type: p.attach_type,
                    ids: ids.map_err(|e| e.to_string()),
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
        let fd = self
            .maps
            .stats
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| DataplaneError::Dup {
                map: map_names::BACKEND_STATS,
                source,
            })?;
        let data = MapData::from_fd(fd).map_err(map_err(map_names::BACKEND_STATS))?;
        let map = HashMap::try_from(aya::maps::Map::HashMap(data))
            .map_err(map_err(map_names::BACKEND_STATS))?;
        Ok(StatsReader(map))
    }

    /// How full the maps are, from the agent's record of what it wrote
    /// (walking 100k+ keys with a syscall each on every scrape blocked
    /// updates).
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
