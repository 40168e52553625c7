//! `balancer-agent check`: will it run on this node (`--preflight`), and
//! is it running well (against a running agent's admin socket). One line
//! per item, `ok` / `warn` / `fail`, each with a one-line hint, as
//! `linkerd check` and `cilium status` do; non-zero exit on any `fail`.

#![expect(
    unsafe_code,
    reason = "the seccomp probe is a raw bpf(2) BPF_MAP_CREATE: no safe wrapper creates a map \
              without loading an object"
)]

use std::{
    os::fd::{FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::api::{EndpointsView, Request, StatusView};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "fail",
        }
    }
}

/// One checked item.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub name: &'static str,
    pub level: Level,
    /// What was found.
    pub detail: String,
    /// What to do about it (empty when ok).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hint: String,
}

/// Every item, and whether none failed.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub ok: bool,
    pub items: Vec<Item>,
}

fn item(name: &'static str, level: Level, detail: impl Into<String>, hint: &str) -> Item {
    Item {
        name,
        level,
        detail: detail.into(),
        hint: if level == Level::Ok {
            String::new()
        } else {
            hint.to_owned()
        },
    }
}

/// What `--preflight` looks at.
pub struct Preflight {
    pub cgroup: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub netns_dir: PathBuf,
    /// Also ask the apiserver (a kubeconfig or in-cluster config).
    pub kube: bool,
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// Capability numbers (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

pub async fn preflight(p: &Preflight) -> Report {
    let mut items = vec![kernel(), btf()];
    items.push(cgroup(p.cgroup.as_deref()));
    items.push(bpffs(&p.bpffs));
    let caps = effective_caps();
    items.extend(capabilities(caps));
    items.push(seccomp(caps));
    items.push(netns(&p.netns_dir));
    if p.kube {
        items.extend(apiserver().await);
    } else {
        items.push(item(
            "apiserver",
            Level::Warn,
            "not asked",
            "run with --kube where the agent's kubeconfig or service account is, to check the \
             apiserver and RBAC",
        ));
    }
    report("preflight", items)
}

fn report(mode: &'static str, items: Vec<Item>) -> Report {
    Report {
        mode,
        ok: !items.iter().any(|i| i.level == Level::Fail),
        items,
    }
}

fn kernel() -> Item {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let level = if (major, minor) >= (5, 10) {
        Level::Ok
    } else {
        Level::Fail
    };
    item(
        "kernel",
        level,
        format!("Linux {release}"),
        "the programs need Linux 5.10 or later (cgroup sock_addr, sock_ops, sk_msg, sk_storage)",
    )
}

fn btf() -> Item {
    let ok = Path::new("/sys/kernel/btf/vmlinux").exists();
    item(
        "btf",
        if ok { Level::Ok } else { Level::Fail },
        if ok {
            "/sys/kernel/btf/vmlinux"
        } else {
            "no /sys/kernel/btf/vmlinux"
        },
        "the kernel needs CONFIG_DEBUG_INFO_BTF=y",
    )
}

fn fs_type(path: &Path) -> Option<i64> {
    nix::sys::statfs::statfs(path)
        .ok()
        .map(|s| s.filesystem_type().0)
}

fn cgroup(configured: Option<&Path>) -> Item {
    let path = match configured {
        Some(p) => p.to_path_buf(),
        None => match crate::node::cgroup2_root() {
            Ok(p) => p,
            Err(e) => {
                return item(
                    "cgroup",
                    Level::Fail,
                    format!("no cgroup v2 mount: {e}"),
                    "the programs attach to the unified hierarchy: boot with cgroup v2 \
                     (systemd.unified_cgroup_hierarchy=1) or mount it, and pass it as --cgroup",
                );
            }
        },
    };
    let level = match fs_type(&path) {
        Some(CGROUP2_SUPER_MAGIC) => Level::Ok,
        _ => Level::Fail,
    };
    item(
        "cgroup",
        level,
        if level == Level::Ok {
            format!("{} is cgroup v2", path.display())
        } else {
            format!("{} is not a cgroup v2 directory", path.display())
        },
        "the programs attach to the unified hierarchy: boot with cgroup v2 \
         (systemd.unified_cgroup_hierarchy=1) and pass its mount as --cgroup",
    )
}

fn bpffs(dir: &Path) -> Item {
    // The agent creates its directory under a bpffs mount.
    let on_bpffs = |p: &Path| fs_type(p) == Some(BPF_FS_MAGIC);
    let found = std::iter::successors(Some(dir), |p| p.parent())
        .find(|p| p.exists())
        .filter(|p| on_bpffs(p));
    item(
        "bpffs",
        if found.is_some() {
            Level::Ok
        } else {
            Level::Fail
        },
        match found {
            Some(p) => format!("{} is on bpffs", p.display()),
            None => format!("{} is not on a bpffs mount", dir.display()),
        },
        "mount bpffs (mount -t bpf bpf /sys/fs/bpf) and, in a container, mount the host's \
         /sys/fs/bpf with mountPropagation HostToContainer; --pin keeps the data path there",
    )
}

/// The effective capability set of this process.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

fn has(caps: u64, cap: u32) -> bool {
    caps & (1 << cap) != 0
}

fn capabilities(caps: u64) -> Vec<Item> {
    let names = |wanted: &[(u32, &'static str)]| -> Vec<&'static str> {
        wanted
            .iter()
            .filter(|(c, _)| !has(caps, *c))
            .map(|(_, n)| *n)
            .collect()
    };
    // CAP_SYS_ADMIN covers BPF and PERFMON (pre-5.8 style).
    let sys_admin = has(caps, CAP_SYS_ADMIN);
    let agent_missing = names(&[
        (CAP_BPF, "CAP_BPF"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_PERFMON, "CAP_PERFMON"),
    ])
    .into_iter()
    .filter(|n| !(sys_admin && (*n == "CAP_BPF" || *n == "CAP_PERFMON")))
    .collect::<Vec<_>>();
    let mut out = vec![item(
        "capabilities",
        if agent_missing.is_empty() {
            Level::Ok
        } else {
            Level::Fail
        },
        if agent_missing.is_empty() {
            "the agent's: CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON".to_owned()
        } else {
            format!("missing {}", agent_missing.join(", "))
        },
        "the agent loads and attaches eBPF programs: add BPF, NET_ADMIN and PERFMON to the \
         container's capabilities (manifests/daemonset.yaml)",
    )];
    out.push(item(
        "capabilities (namespaces)",
        if sys_admin { Level::Ok } else { Level::Warn },
        if sys_admin {
            "CAP_SYS_ADMIN: client pods' namespaces can be entered (setns)"
        } else {
            "no CAP_SYS_ADMIN: client pods' namespaces cannot be entered"
        },
        "the router's --source-identity pod and the agent's --end-removed-connections enter \
         client pods' network namespaces: add SYS_ADMIN (the shipped seccomp profile lets setns \
         through only for network namespaces)",
    ));
    out
}

/// Create a one-entry array map and close it: whether `bpf(2)` gets
/// through the seccomp filter (and the capabilities) at all.
fn try_bpf() -> Result<(), std::io::Error> {
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size,
    // max_entries, then zeroes.
    let mut attr = [0u32; 32];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4;
    attr[2] = 8;
    attr[3] = 1;
    // SAFETY: `attr` is a zeroed, correctly sized `bpf_attr` for
    // BPF_MAP_CREATE (0) that lives across the call; the kernel reads at
    // most the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us alone.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(())
}

fn seccomp_mode() -> Option<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .and_then(|v| v.trim().parse().ok())
        })
}

fn seccomp(caps: u64) -> Item {
    let filtered = seccomp_mode() == Some(2);
    match try_bpf() {
        Ok(()) => item(
            "seccomp",
            Level::Ok,
            format!(
                "bpf(2) allowed{}",
                if filtered {
                    " by the seccomp filter"
                } else {
                    ""
                }
            ),
            "",
        ),
        Err(e) => {
            let caps_ok = has(caps, CAP_BPF) || has(caps, CAP_SYS_ADMIN);
            let why = if caps_ok && filtered {
                "a seccomp filter refuses bpf(2) (the runtime's default profile allows it only \
                 with CAP_SYS_ADMIN)"
            } else if !caps_ok {
                "no CAP_BPF"
            } else {
                "the kernel refused"
            };
            item(
                "seccomp",
                Level::Fail,
                format!("bpf(BPF_MAP_CREATE) failed: {e}: {why}"),
                if caps_ok {
                    "install manifests/seccomp/balancer-agent.json on every node \
                     (manifests/seccomp/README.md) and set it as the container's Localhost \
                     seccompProfile, as manifests/daemonset.yaml does"
                } else {
                    "add the BPF capability (see capabilities above), then check again"
                },
            )
        }
    }
}

fn netns(dir: &Path) -> Item {
    if !dir.is_dir() {
        return item(
            "netns",
            Level::Warn,
            format!("{} does not exist", dir.display()),
            "mount the runtime's namespace directory (containerd and CRI-O: /var/run/netns) \
             with mountPropagation HostToContainer; without it clients are served with the \
             node's address at L4 and removed endpoints' connections are left to TCP",
        );
    }
    let count = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    match crate::router::netns::Namespaces::new(dir.to_owned()) {
        Ok(_) => item(
            "netns",
            Level::Ok,
            format!("{} ({count} namespace files), setns allowed", dir.display()),
            "",
        ),
        Err(e) => item(
            "netns",
            Level::Warn,
            format!("{}: {e}", dir.display()),
            "add SYS_ADMIN and the shipped seccomp profile, or run the router with \
             --source-identity node and the agent with --end-removed-connections=false",
        ),
    }
}

async fn apiserver() -> Vec<Item> {
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            return vec![item(
                "apiserver",
                Level::Fail,
                format!("no Kubernetes configuration: {e}"),
                "set KUBECONFIG, or run in a pod with its service account",
            )];
        }
    };
    let version = match client.apiserver_version().await {
        Ok(v) => v,
        Err(e) => {
            return vec![item(
                "apiserver",
                Level::Fail,
                format!("no answer: {e}"),
                "check the apiserver address and the network policy to it",
            )];
        }
    };
    let mut out = vec![item(
        "apiserver",
        Level::Ok,
        format!("answers, {}", version.git_version),
        "",
    )];
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let api: kube::Api<SelfSubjectAccessReview> = kube::Api::all(client);
    let mut denied = Vec::new();
    let mut errors = Vec::new();
    for (group, resource) in [
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "nodes"),
    ] {
        for verb in ["list", "watch"] {
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        group: Some(group.into()),
                        resource: Some(resource.into()),
                        verb: Some(verb.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            match api.create(&kube::api::PostParams::default(), &review).await {
                Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => {}
                Ok(_) => denied.push(format!("{verb} {resource}")),
                Err(e) => errors.push(format!("{verb} {resource}: {e}")),
            }
        }
    }
    out.push(if !errors.is_empty() {
        item(
            "rbac",
            Level::Fail,
            format!(
                "cannot ask (SelfSubjectAccessReview): {}",
                errors.join("; ")
            ),
            "the agent's service account needs list and watch on services, endpointslices and \
             nodes: apply manifests/clusterrole.yaml and clusterrolebinding.yaml",
        )
    } else if denied.is_empty() {
        item(
            "rbac",
            Level::Ok,
            "list and watch on services, endpointslices, nodes",
            "",
        )
    } else {
        item(
            "rbac",
            Level::Fail,
            format!("denied: {}", denied.join(", ")),
            "the agent's service account needs list and watch on services, endpointslices and \
             nodes: apply manifests/clusterrole.yaml and clusterrolebinding.yaml",
        )
    });
    out
}

/// The running agent, through its admin socket.
pub async fn running(admin_socket: &Path) -> Report {
    let status: StatusView = match crate::admin::request(admin_socket, &Request::Status).await {
        Ok(s) => s,
        Err(e) => {
            return report(
                "running",
                vec![item(
                    "agent",
                    Level::Fail,
                    format!("no answer on {}: {e}", admin_socket.display()),
                    "is the agent running? pass its --admin-socket; `balancer-agent check \
                     --preflight` says why it may not start",
                )],
            );
        }
    };
    let endpoints: Option<EndpointsView> =
        crate::admin::request(admin_socket, &Request::Endpoints { name: None })
            .await
            .ok();
    report("running", running_items(&status, endpoints.as_ref()))
}

/// The items of a running agent's status (pure, for tests).
pub fn running_items(s: &StatusView, endpoints: Option<&EndpointsView>) -> Vec<Item> {
    let mut items = vec![item(
        "agent",
        Level::Ok,
        format!("version {}, cgroup {}", s.version, s.cgroup),
        "",
    )];
    let detached: Vec<&str> = s
        .programs
        .iter()
        .filter(|p| !p.attached)
        .map(|p| p.name.as_str())
        .collect();
    items.push(item(
        "programs",
        if detached.is_empty() {
            Level::Ok
        } else {
            Level::Fail
        },
        if detached.is_empty() {
            format!("{} attached, as the kernel reports", s.programs.len())
        } else {
            format!("not attached: {}", detached.join(", "))
        },
        "restart the agent; `balancer-agent status` shows what the kernel reports",
    ));
    let before: Vec<String> = s
        .programs
        .iter()
        .filter(|p| p.attach_type.contains("connect"))
        .flat_map(|p| {
            p.others.iter().filter(|o| o.before).map(|o| {
                format!(
                    "{} (id {}) on {}",
                    if o.name.is_empty() {
                        "a program"
                    } else {
                        &o.name
                    },
                    o.id,
                    p.attach_type
                )
            })
        })
        .collect();
    items.push(item(
        "hooks",
        if before.is_empty() {
            Level::Ok
        } else {
            Level::Warn
        },
        if before.is_empty() {
            "no other program runs before ours on connect4/6".to_owned()
        } else {
            format!("runs before ours: {}", before.join(", "))
        },
        "a CNI's socket load balancer that rewrites a VIP first takes that service from us: \
         turn its socket LB off for the services to balance here (README, beside a CNI)",
    ));
    items.push(match &s.router {
        None => item(
            "router",
            Level::Warn,
            "none: http2 ports are balanced per connection",
            "run the router container (or `run --proxy-addr`) to spread HTTP/2 streams",
        ),
        Some(r) if !r.alive => item(
            "router",
            Level::Fail,
            format!(
                "down at {} (heartbeat {} ms ago): http2 ports fall back to L4",
                r.address, r.heartbeat_age_ms
            ),
            "see the router container's log; it restarts by itself in the DaemonSet",
        ),
        Some(r) => match &r.process {
            Some(p) if p.generation == s.generation => item(
                "router",
                Level::Ok,
                format!(
                    "alive at {}, serving table generation {}",
                    r.address, p.generation
                ),
                "",
            ),
            Some(p) => item(
                "router",
                Level::Warn,
                format!(
                    "alive at {}, serving table generation {} of {}",
                    r.address, p.generation, s.generation
                ),
                "it re-reads the table when the generation moves: check again in a second; \
                 if it stays behind, see its log",
            ),
            None => item(
                "router",
                Level::Warn,
                format!(
                    "alive at {} but does not answer on its socket{}",
                    r.address,
                    r.error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
                "pass the router's --admin-socket as the agent's --router-socket",
            ),
        },
    });
    let r = &s.last_reload;
    items.push(match &s.apiserver {
        Some(a) if a.state != crate::api::Apiserver::Synced => item(
            "source",
            Level::Fail,
            format!(
                "apiserver {}{}",
                a.state.as_str(),
                a.last_error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
            "the last good state keeps serving; check the apiserver and the agent's RBAC \
             (`check --preflight --kube`)",
        ),
        _ if !r.ok => item(
            "source",
            Level::Fail,
            format!("last update refused: {}", r.error.as_deref().unwrap_or("?")),
            "the last good state keeps serving; fix the source (the error names it)",
        ),
        _ => item(
            "source",
            Level::Ok,
            format!(
                "{} synced: {} services, {} frontends",
                s.source.kind, r.services, r.frontends
            ),
            "",
        ),
    });
    let full: Vec<String> = s
        .maps
        .iter()
        .filter(|m| m.max_entries > 0 && m.entries * 10 >= m.max_entries as usize * 8)
        .map(|m| format!("{} {}/{}", m.name, m.entries, m.max_entries))
        .collect();
    items.push(item(
        "maps",
        if full.is_empty() {
            Level::Ok
        } else {
            Level::Warn
        },
        if full.is_empty() {
            "every map under 80% full".to_owned()
        } else {
            format!("80% full or more: {}", full.join(", "))
        },
        "a full map refuses the next update (the last good state keeps serving): fewer \
         services or endpoints per node, or a bigger build",
    ));
    // The per-socket maps (ORIG_DST, SOCKS, SPLICE, BALANCED, socket
    // storage) are the kernel's to fill: a full one shows as a counter.
    let overflowed: Vec<String> = s
        .counters
        .iter()
        .filter(|(name, n)| name.ends_with("_full") && **n > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    items.push(item(
        "socket maps",
        if overflowed.is_empty() {
            Level::Ok
        } else {
            Level::Warn
        },
        if overflowed.is_empty() {
            "no per-socket map was ever full".to_owned()
        } else {
            format!("inserts refused by a full map: {}", overflowed.join(", "))
        },
        "more open sockets than a map holds (65,536 each): those sockets are balanced but not \
         followed (stream counts, router hand-off, ending when their endpoint goes)",
    ));
    let ejected: Vec<String> = endpoints
        .map(|v| {
            v.services
                .iter()
                .flat_map(|svc| {
                    svc.endpoints.iter().filter_map(move |e| {
                        e.ejected
                            .as_ref()
                            .map(|why| format!("{} {}:{} ({why})", svc.name, e.address, e.port))
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    items.push(item(
        "ejected",
        if ejected.is_empty() {
            Level::Ok
        } else {
            Level::Warn
        },
        if ejected.is_empty() {
            "no endpoint ejected".to_owned()
        } else {
            format!("{}: {}", ejected.len(), ejected.join(", "))
        },
        "their connects or requests fail; they are probed and come back when they answer \
         (`balancer-agent endpoints`)",
    ));
    let refused = s.counters.get("no_backend").copied().unwrap_or(0);
    items.push(item(
        "refused",
        if refused == 0 { Level::Ok } else { Level::Warn },
        format!("{refused} connects refused for lack of endpoints"),
        "a service with no ready endpoint refuses connects (ECONNREFUSED), as with \
         kube-proxy: check its pods' readiness",
    ));
    if let Some(rc) = &s.removed_connections {
        let unreachable: u64 = rc.services.values().map(|e| e.unreachable).sum();
        items.push(item(
            "removed",
            if unreachable == 0 && rc.enters_namespaces {
                Level::Ok
            } else {
                Level::Warn
            },
            format!(
                "{} connections of removed endpoints ended, {unreachable} unreachable{}",
                rc.services.values().map(|e| e.ended).sum::<u64>(),
                if rc.enters_namespaces {
                    ""
                } else {
                    "; no CAP_SYS_ADMIN, only hostNetwork clients' are ended"
                }
            ),
            "mount the runtime's namespace directory as --netns-dir and add SYS_ADMIN",
        ));
    }
    items
}

/// `balancer-agent check`.
pub async fn run(args: crate::args::CheckArgs) -> anyhow::Result<()> {
    let report = if args.preflight {
        preflight(&Preflight {
            cgroup: args.cgroup,
            bpffs: args.bpffs,
            netns_dir: args.netns_dir,
            kube: args.kube,
        })
        .await
    } else {
        running(&args.admin.admin_socket).await
    };
    print(&report, args.admin.output.is_json())
}

/// Print `r` (or its JSON); an error when an item failed.
pub fn print(r: &Report, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        let width = r.items.iter().map(|i| i.name.len()).max().unwrap_or(0);
        for i in &r.items {
            println!("{:<4}  {:<width$}  {}", i.level.as_str(), i.name, i.detail);
            if !i.hint.is_empty() {
                println!("      {:<width$}  hint: {}", "", i.hint);
            }
        }
    }
    let failed = r.items.iter().filter(|i| i.level == Level::Fail).count();
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed");
    }
    Ok(())
}
