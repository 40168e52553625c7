//! README's "The first hour on a cluster", run as written: every
//! `balancer-agent` command it shows is run here, against a real agent and
//! router (and, for `--kube`, the fake apiserver), and every `kubectl exec`
//! names a namespace, DaemonSet and container the manifests define, whose
//! admin socket is the CLI's default (so the command needs no flag).

use std::{path::Path, process::Command};

use balancer_tests::{
    agent::{Agent, agent_bin},
    fakeapi::FakeApi,
    netns::unique_prefix,
    process::require_root,
    topology::Topology,
};
use k8s_openapi::api::apps::v1::DaemonSet;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The commands of the section's shell block (comments dropped).
fn commands() -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README");
    let start = readme
        .find("## The first hour on a cluster")
        .expect("the first hour section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh block");
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_command_of_the_first_hour_runs_as_written() {
    require_root();
    let cmds = commands();
    assert!(cmds.len() >= 4, "{cmds:?}");
    let ds: DaemonSet = serde_saphyr::from_str(
        &std::fs::read_to_string(root().join("manifests/daemonset.yaml")).expect("daemonset"),
    )
    .expect("daemonset yaml");
    let spec = ds
        .spec
        .clone()
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    let t = Topology::new("firsthour", 2, &[8080]).expect("topology");
    let agent = Agent::start_web_with_router(&t, "198.19.0.82").expect("agent");
    let dir = std::env::temp_dir().join(unique_prefix("firsthourapi"));
    let api = FakeApi::start(&dir).expect("fake apiserver");
    for line in &cmds {
        let words: Vec<&str> = line.split_whitespace().collect();
        // `kubectl -n NS exec ds/NAME -c CONTAINER -- balancer-agent ...`:
        // the names are the manifests', and what runs is the rest.
        let cli: Vec<&str> = if words[0] == "kubectl" {
            let at = |flag: &str| {
                words
                    .iter()
                    .position(|w| *w == flag)
                    .map(|i| words[i + 1])
                    .unwrap_or_else(|| panic!("{flag} in {line}"))
            };
            assert_eq!(Some(at("-n")), ds.metadata.namespace.as_deref(), "{line}");
            let target = words
                .iter()
                .find_map(|w| w.strip_prefix("ds/"))
                .unwrap_or_else(|| panic!("ds/ in {line}"));
            assert_eq!(Some(target), ds.metadata.name.as_deref(), "{line}");
            let container = spec
                .containers
                .iter()
                .find(|c| c.name == at("-c"))
                .unwrap_or_else(|| panic!("no container {} in the DaemonSet", at("-c")));
            // The container's admin socket is the CLI's default.
            let args = container.args.clone().unwrap_or_default();
            assert!(
                args.iter()
                    .any(|a| a == "--admin-socket=/run/balancer/admin.sock"),
                "{args:?}"
            );
            let dashes = words.iter().position(|w| *w == "--").expect("--");
            words[dashes + 1..].to_vec()
        } else {
            words.clone()
        };
        assert_eq!(cli[0], "balancer-agent", "{line}");
        let mut cmd = Command::new(agent_bin());
        cmd.args(&cli[1..]);
        if cli.contains(&"--preflight") {
            cmd.env("KUBECONFIG", &api.kubeconfig);
        } else {
            // Here the agent's socket is the test's, not the default.
            cmd.arg("--admin-socket").arg(&agent.admin_socket);
        }
        if cli[1] == "top" {
            // It refreshes until Ctrl-C.
            cmd.args(["--iterations", "1", "--interval", "100ms"]);
        }
        let out = cmd.output().expect("run");
        assert!(
            out.status.success(),
            "{line}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.trim().is_empty(), "{line} printed nothing");
        eprintln!("$ {line}\n{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
