//! The router's routing table, read from the maps the agent pinned for the
//! kernel: one source of truth, and no channel between the two processes.
//! The control plane can crash, restart or be upgraded while the router
//! keeps the last table it read and keeps serving.
//!
//! `GENERATION` is a seqlock the agent steps around every plan it writes
//! (odd while writing). The router polls it and re-reads `SERVICES`,
//! `SLOTS` and `BACKENDS` when it moved; a read that saw the generation
//! change under it is retried.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::maps::{Array, HashMap, MapData, MapError, MapInfo};
use balancer_common::{Backend, Mode, ServiceKey, ServiceValue, SlotKey, map_names};

use super::endpoint::Algorithm;
use crate::dataplane::{pin, plan::words_addr};

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    Pin(#[from] pin::PinError),
    #[error("pinned map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the routing table kept changing while it was read (generation {0})")]
    Unsettled(u64),
}

/// One http2 service port: its VIP, how streams are spread, its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub vip: SocketAddr,
    pub algorithm: Algorithm,
    pub backends: Vec<SocketAddr>,
}

/// The pinned maps the routing table is read from.
pub struct PinnedTable {
    dir: PathBuf,
    /// Kernel id of the GENERATION map opened: a new agent that pinned a
    /// fresh data path (after `cleanup`) pins maps with other ids.
    id: u32,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, Backend>,
    generation: Array<MapData, u64>,
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> TableError {
    move |source| TableError::Map { map, source }
}

/// The kernel id of the GENERATION map pinned in `dir`, if there is one.
pub fn pinned_id(dir: &Path) -> Option<u32> {
    MapInfo::from_pin(dir.join("maps").join(map_names::GENERATION))
        .ok()
        .map(|i| i.id())
}

impl PinnedTable {
    pub fn open(dir: &Path) -> Result<Self, TableError> {
        let open = |name: &'static str| pin::open_map(dir, name);
        let id = pinned_id(dir).ok_or_else(|| {
            TableError::Pin(pin::PinError::Open {
                path: dir.join("maps").join(map_names::GENERATION),
                message: "not pinned".into(),
            })
        })?;
        Ok(Self {
            dir: dir.to_owned(),
            id,
            services: HashMap::try_from(open(map_names::SERVICES)?)
                .map_err(map_err(map_names::SERVICES))?,
            slots: HashMap::try_from(open(map_names::SLOTS)?).map_err(map_err(map_names::SLOTS))?,
            backends: HashMap::try_from(open(map_names::BACKENDS)?)
                .map_err(map_err(map_names::BACKENDS))?,
            generation: Array::try_from(open(map_names::GENERATION)?)
                .map_err(map_err(map_names::GENERATION))?,
        })
    }

    /// True while the pins are the maps this table opened.
    pub fn current(&self) -> bool {
        pinned_id(&self.dir) == Some(self.id)
    }

    pub fn generation(&self) -> Result<u64, TableError> {
        self.generation
            .get(&0, 0)
            .map_err(map_err(map_names::GENERATION))
    }

    /// A consistent read of every http2 service port, and the generation
    /// it is of.
    pub fn read(&self) -> Result<(u64, Vec<Route>), TableError> {
        let mut last = 0;
        for _ in 0..20 {
            let before = self.generation()?;
            last = before;
            if before % 2 == 1 {
                // A plan is being written: it takes milliseconds.
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let routes = self.read_routes()?;
            if self.generation()? == before {
                return Ok((before, routes));
            }
        }
        Err(TableError::Unsettled(last))
    }

    fn read_routes(&self) -> Result<Vec<Route>, TableError> {
        let mut routes = Vec::new();
        for entry in self.services.iter() {
            let (key, value) = entry.map_err(map_err(map_names::SERVICES))?;
            if value.mode != Mode::Http2 as u8 {
                continue;
            }
            let mut backends = Vec::with_capacity(value.backend_count as usize);
            for slot in 0..value.backend_count {
                let k = SlotKey {
                    service_id: value.id,
                    slot,
                };
                // A slot or backend missing mid-update is skipped: the
                // generation check retries the whole read.
                let Ok(id) = self.slots.get(&k, 0) else {
                    continue;
                };
                let Ok(b) = self.backends.get(&id, 0) else {
                    continue;
                };
                let addr = SocketAddr::new(words_addr(b.addr), u16::from_be(b.port));
                if !backends.contains(&addr) {
                    backends.push(addr);
                }
            }
            routes.push(Route {
                vip: SocketAddr::new(words_addr(key.addr), u16::from_be(key.port)),
                algorithm: balancer_common::Algorithm::from_u8(value.algorithm)
                    .map_or(Algorithm::LeastRequest, Algorithm::from),
                backends,
            });
        }
        routes.sort_by_key(|r| r.vip);
        Ok(routes)
    }
}
