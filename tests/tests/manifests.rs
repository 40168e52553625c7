//! The deployment manifests: valid against the real Kubernetes schemas
//! (PyPI kubernetes-validate, strict), deserializable into k8s-openapi
//! types, and least-privilege.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

const FILES: [&str; 6] = [
    "namespace.yaml",
    "serviceaccount.yaml",
    "clusterrole.yaml",
    "clusterrolebinding.yaml",
    "configmap.yaml",
    "daemonset.yaml",
];

fn load<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let text = std::fs::read_to_string(dir().join(file)).expect("read manifest");
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn validate(paths: &[PathBuf]) -> std::process::Output {
    // As a module: pip's console script may not be on PATH (pyenv shims).
    Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .args(paths)
        .output()
        .expect("kubernetes-validate (cargo xtask setup installs it)")
}

#[test]
fn manifests_pass_strict_schema_validation_and_a_broken_one_does_not() {
    let paths: Vec<PathBuf> = FILES.iter().map(|f| dir().join(f)).collect();
    let out = validate(&paths);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The validator really checks: a misspelt field fails.
    let bad = std::env::temp_dir().join(format!("lbt-bad-ds-{}.yaml", std::process::id()));
    let ds = std::fs::read_to_string(dir().join("daemonset.yaml")).expect("read");
    std::fs::write(&bad, ds.replace("hostNetwork: true", "hostNetwrk: true")).expect("write");
    let out = validate(std::slice::from_ref(&bad));
    let _ = std::fs::remove_file(&bad);
    assert!(
        !out.status.success(),
        "a misspelt field must fail validation"
    );
}

#[test]
fn manifests_deserialize_into_kubernetes_types() {
    let ns: Namespace = load("namespace.yaml");
    assert_eq!(ns.metadata.name.as_deref(), Some("balancer-system"));
    let sa: ServiceAccount = load("serviceaccount.yaml");
    let crb: ClusterRoleBinding = load("clusterrolebinding.yaml");
    assert_eq!(crb.role_ref.name, "balancer-agent");
    let subject = &crb.subjects.as_ref().expect("subjects")[0];
    assert_eq!(Some(subject.name.as_str()), sa.metadata.name.as_deref());
    let cm: ConfigMap = load("configmap.yaml");
    assert!(cm.data.expect("data").contains_key("drain-timeout"));
    let kustomization = std::fs::read_to_string(dir().join("kustomization.yaml")).expect("read");
    for f in FILES {
        assert!(kustomization.contains(f), "kustomization.yaml lacks {f}");
    }
}

#[test]
fn rbac_is_exactly_get_list_watch_on_services_endpointslices_nodes() {
    let role: ClusterRole = load("clusterrole.yaml");
    let rules = role.rules.expect("rules");
    let mut resources = BTreeSet::new();
    for r in &rules {
        let verbs: BTreeSet<&str> = r.verbs.iter().map(String::as_str).collect();
        assert_eq!(verbs, BTreeSet::from(["get", "list", "watch"]), "{r:?}");
        for g in r.api_groups.iter().flatten() {
            assert_ne!(g, "*");
        }
        for res in r.resources.iter().flatten() {
            assert_ne!(res, "*");
            resources.insert(res.clone());
        }
        assert!(r.non_resource_urls.is_none() && r.resource_names.is_none());
    }
    assert_eq!(
        resources,
        BTreeSet::from([
            "endpointslices".to_owned(),
            "nodes".to_owned(),
            "services".to_owned()
        ])
    );
}

#[test]
fn daemonset_is_least_privilege_node_critical_and_probed() {
    let ds: DaemonSet = load("daemonset.yaml");
    let spec = ds.spec.expect("spec").template.spec.expect("pod spec");
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tol = spec.tolerations.expect("tolerations");
    assert!(
        tol.iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    );
    // The control plane and the router: two containers, each with its own
    // capabilities, probes (on its own port) and resources.
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["agent", "router"]);
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|h| (h.path.clone().unwrap_or_default(), h.port.clone()))
    };
    for (c, caps_want, port) in [
        // The agent's SYS_ADMIN: setns(CLONE_NEWNET) into client pods'
        // namespaces, to end a removed endpoint's sockets there
        // (--end-removed-connections).
        (
            &spec.containers[0],
            BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]),
            9464,
        ),
        // The router's SYS_ADMIN: setns(CLONE_NEWNET) into client pods'
        // namespaces (--source-identity pod). Spelt without `CAP_`: the API
        // refuses `CAP_SYS_ADMIN` beside allowPrivilegeEscalation false.
        (
            &spec.containers[1],
            BTreeSet::from(["BPF", "SYS_ADMIN"]),
            9465,
        ),
    ] {
        let sc = c.security_context.as_ref().expect("securityContext");
        assert_eq!(sc.privileged, Some(false), "{}", c.name);
        let caps = sc.capabilities.as_ref().expect("capabilities");
        let add: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
        assert_eq!(add, caps_want, "{}", c.name);
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
        // The default seccomp profile blocks bpf(2) for CAP_BPF: the one
        // shipped, installed as a Localhost profile.
        let seccomp = sc.seccomp_profile.as_ref().expect("seccompProfile");
        assert_eq!(seccomp.type_, "Localhost", "{}", c.name);
        let file = seccomp
            .localhost_profile
            .as_deref()
            .expect("localhostProfile");
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests/seccomp")
            .join(file);
        let profile: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&shipped).expect("profile"))
                .expect("profile json");
        // setns only into a network namespace (the router's, for its
        // pod connections; the kernel checks CAP_SYS_ADMIN), and what else
        // CAP_SYS_ADMIN would open refused: each in one rule without
        // `includes`/`excludes`, which containerd ignores.
        let rules = profile["syscalls"].as_array().expect("syscalls");
        let with = |call: &str| -> Vec<&serde_json::Value> {
            rules
                .iter()
                .filter(|r| {
                    r["names"]
                        .as_array()
                        .is_some_and(|n| n.iter().any(|n| n == call))
                })
                .collect()
        };
        // A rule, short: its action, conditions and how many calls.
        let brief = |rs: &[&serde_json::Value]| -> Vec<String> {
            rs.iter()
                .map(|r| {
                    format!(
                        "{} args={} includes={} excludes={} ({} calls)",
                        r["action"],
                        r["args"],
                        r["includes"],
                        r["excludes"],
                        r["names"].as_array().map_or(0, Vec::len)
                    )
                })
                .collect()
        };
        let setns = with("setns");
        assert_eq!(setns.len(), 1, "one setns rule: {:?}", brief(&setns));
        assert_eq!(setns[0]["action"], "SCMP_ACT_ALLOW");
        assert_eq!(
            setns[0]["args"],
            serde_json::json!([{"index": 1, "op": "SCMP_CMP_EQ", "value": 0x4000_0000, "valueTwo": 0}]),
            "CLONE_NEWNET only"
        );
        for call in [
            "mount",
            "umount2",
            "pivot_root",
            "fsmount",
            "move_mount",
            "open_tree",
            "sethostname",
            "unshare",
        ] {
            let r = with(call);
            assert!(
                r.len() == 1 && r[0]["action"] == "SCMP_ACT_ERRNO" && r[0]["errnoRet"] == 1,
                "{call} refused with EPERM, in one rule: {:?}",
                brief(&r)
            );
        }
        for r in setns.iter().chain(with("mount").iter()) {
            for key in ["includes", "excludes"] {
                assert!(
                    r[key].as_object().is_none_or(|o| o.is_empty()),
                    "{key} in {r}"
                );
            }
        }
        for (call, cap) in [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")] {
            assert!(
                profile["syscalls"]
                    .as_array()
                    .expect("syscalls")
                    .iter()
                    .any(|r| {
                        r["action"] == "SCMP_ACT_ALLOW"
                            && r["names"] == serde_json::json!([call])
                            && r["includes"]["caps"] == serde_json::json!([cap])
                    }),
                "{call} for {cap} in {}",
                shipped.display()
            );
        }
        let port = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port);
        assert_eq!(
            probe(&c.liveness_probe),
            Some(("/healthz".into(), port.clone())),
            "{}",
            c.name
        );
        assert_eq!(
            probe(&c.readiness_probe),
            Some(("/readyz".into(), port)),
            "{}",
            c.name
        );
        let res = c.resources.as_ref().expect("resources");
        assert!(res.requests.is_some() && res.limits.is_some(), "{}", c.name);
        let mounts: BTreeSet<&str> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert!(
            mounts.contains("/sys/fs/bpf") && mounts.contains("/run/balancer"),
            "{}: the pins and the sockets are shared",
            c.name
        );
    }
    let field = |c: &k8s_openapi::api::core::v1::Container, name: &str| {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(
        field(&spec.containers[0], "NODE_NAME").as_deref(),
        Some("spec.nodeName")
    );
    assert_eq!(
        field(&spec.containers[1], "NODE_IP").as_deref(),
        Some("status.hostIP")
    );
    let arg = |c: &k8s_openapi::api::core::v1::Container, a: &str| {
        c.args.iter().flatten().any(|x| x == a)
    };
    assert!(
        arg(&spec.containers[0], "--pin"),
        "the router reads the pins"
    );
    assert!(arg(
        &spec.containers[1],
        "--listen=$(NODE_IP):$(PROXY_PORT)"
    ));
    // The same pin directory: the same cgroup and bpffs.
    for a in [
        "--cgroup=/host/sys/fs/cgroup",
        "--bpffs=/sys/fs/bpf/balancer",
    ] {
        assert!(
            arg(&spec.containers[0], a) && arg(&spec.containers[1], a),
            "{a}"
        );
    }
    assert!(arg(
        &spec.containers[0],
        "--router-socket=/run/balancer/router.sock"
    ));
    assert!(arg(
        &spec.containers[1],
        "--admin-socket=/run/balancer/router.sock"
    ));
    let host_paths: BTreeSet<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.clone()))
        .collect();
    assert!(host_paths.contains("/sys/fs/cgroup") && host_paths.contains("/sys/fs/bpf"));
}

#[test]
fn both_containers_enter_client_namespaces_from_the_runtimes_files_read_only() {
    let ds: DaemonSet = load("daemonset.yaml");
    let spec = ds.spec.expect("spec").template.spec.expect("pod spec");
    let (agent, router) = (&spec.containers[0], &spec.containers[1]);
    // Client identity: pod connections opened from each client pod's own
    // namespace, found in the runtime's netns directory; and the agent ends
    // removed endpoints' sockets there.
    for c in [agent, router] {
        let args = c.args.as_deref().unwrap_or_default();
        assert!(
            args.iter().any(|a| a == "--netns-dir=/var/run/netns"),
            "{}: {args:?}",
            c.name
        );
    }
    let args = router.args.as_deref().unwrap_or_default();
    assert!(
        args.iter()
            .filter(|a| a.starts_with("--source-identity"))
            .all(|a| a == "--source-identity=pod"),
        "the default, pod: {args:?}"
    );
    // The files, not /proc/PID/ns/net: no host PID namespace.
    assert_ne!(spec.host_pid, Some(true));
    // Read-only, and with the host's later mounts propagated: a pod's
    // namespace file is a bind mount made after the router started.
    let netns = |c: &k8s_openapi::api::core::v1::Container| {
        c.volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == "/var/run/netns")
            .cloned()
    };
    for c in [agent, router] {
        let m = netns(c).expect("mounts /var/run/netns");
        assert_eq!(m.read_only, Some(true), "{}", c.name);
        assert_eq!(
            m.mount_propagation.as_deref(),
            Some("HostToContainer"),
            "{}",
            c.name
        );
        assert!(m.sub_path.is_none() && m.sub_path_expr.is_none());
    }
    let m = netns(router).expect("the router mounts /var/run/netns");
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == m.name)
        .and_then(|v| v.host_path.clone())
        .expect("a hostPath volume");
    assert_eq!(volume.path, "/var/run/netns");
    assert_eq!(volume.type_.as_deref(), Some("DirectoryOrCreate"));
    // Privileged would make the capability list moot.
    let sc = router.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()])
    );
}

#[test]
fn the_agent_accepts_the_daemonset_arguments() {
    // Every flag each container passes exists in its subcommand's CLI.
    let ds: DaemonSet = load("daemonset.yaml");
    let spec = ds.spec.expect("spec").template.spec.expect("pod spec");
    for c in &spec.containers {
        let args = c.args.as_ref().expect("args");
        let help = Command::new(balancer_tests::agent::agent_bin())
            .args([args[0].as_str(), "--help"])
            .output()
            .expect("agent");
        assert!(help.status.success(), "no subcommand {}", args[0]);
        let help = String::from_utf8_lossy(&help.stdout);
        for a in args.iter().skip(1) {
            let flag = a.split('=').next().unwrap_or("");
            assert!(help.contains(flag), "{} has no {flag}:\n{help}", args[0]);
        }
    }
}
