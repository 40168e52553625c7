//! Every command's `--help`, against the text in `tests/golden/help/`: a
//! flag renamed, dropped or reworded by a refactor shows here. A change
//! meant to reach users updates the golden file in the same commit:
//! `balancer-agent CMD --help > tests/golden/help/CMD.txt`.

use std::process::Command;

use balancer_tests::agent::{SUBCOMMANDS, agent_bin};

#[test]
fn every_commands_help_reads_as_the_golden_text() {
    let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/golden/help");
    let mut differ = Vec::new();
    for cmd in std::iter::once("").chain(SUBCOMMANDS) {
        let mut c = Command::new(agent_bin());
        if !cmd.is_empty() {
            c.arg(cmd);
        }
        let out = c.arg("--help").output().expect("--help");
        assert!(out.status.success(), "{cmd} --help");
        let name = if cmd.is_empty() {
            "balancer-agent"
        } else {
            cmd
        };
        let want = std::fs::read_to_string(format!("{golden}/{name}.txt"))
            .unwrap_or_else(|e| panic!("{golden}/{name}.txt: {e}"));
        let got = String::from_utf8_lossy(&out.stdout);
        if got != want {
            differ.push(format!(
                "--- {name} --help now:\n{got}\n--- golden:\n{want}"
            ));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}
