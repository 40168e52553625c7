//! ARCHITECTURE.md stays true: every file or directory it names exists,
//! every command-line flag it names is one a `balancer-agent` command
//! takes, every map in its map table is one the programs define, and every
//! shared type it spells out as `Type {fields}` has exactly those fields.
//! A rename that forgets the document fails here.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use balancer_tests::agent::{SUBCOMMANDS, agent_bin};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn architecture() -> String {
    std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md")
}

/// The text of every `code span` in `md`.
fn spans(md: &str) -> Vec<String> {
    md.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Every file and directory of the workspace (no target, no .git), as
/// paths relative to its root, directories with a trailing `/`.
fn tree() -> Vec<String> {
    let root = root();
    let mut out = Vec::new();
    let mut todo = vec![root.clone()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let p = e.path();
            let name = e.file_name();
            if name == "target" || name == ".git" {
                continue;
            }
            let rel = p
                .strip_prefix(&root)
                .expect("under root")
                .display()
                .to_string();
            if p.is_dir() {
                out.push(format!("{rel}/"));
                todo.push(p);
            } else {
                out.push(rel);
            }
        }
    }
    out
}

/// `{a,b}` alternatives, expanded.
fn expand(s: &str) -> Vec<String> {
    match (s.find('{'), s.find('}')) {
        (Some(a), Some(b)) if a < b => s[a + 1..b]
            .split(',')
            .flat_map(|alt| expand(&format!("{}{alt}{}", &s[..a], &s[b + 1..])))
            .collect(),
        _ => vec![s.to_owned()],
    }
}

fn looks_like_path(s: &str) -> bool {
    let exts = [".rs", ".md", ".yaml", ".json", ".py", ".go", ".toml"];
    !s.is_empty()
        && !s.contains(char::is_whitespace)
        && !s.starts_with('/')
        && !s.starts_with('<')
        && !s.contains('*')
        && !s.contains(':')
        && !s.contains('[')
        && (exts.iter().any(|e| s.ends_with(e)) || s.ends_with('/'))
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./{},".contains(c))
}

#[test]
fn every_path_architecture_names_exists() {
    let files = tree();
    let mut missing = Vec::new();
    let mut checked = 0;
    for span in spans(&architecture()) {
        if !looks_like_path(&span) {
            continue;
        }
        for p in expand(&span) {
            checked += 1;
            let found = files
                .iter()
                .any(|f| f == &p || f.ends_with(&format!("/{p}")));
            if !found {
                missing.push(p);
            }
        }
    }
    assert!(
        checked >= 50,
        "only {checked} paths found: is the extractor broken?"
    );
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names paths that do not exist: {missing:?}"
    );
}

#[test]
fn every_flag_architecture_names_is_taken_by_a_command() {
    let mut help = String::new();
    for cmd in SUBCOMMANDS {
        let out = Command::new(agent_bin())
            .args([cmd, "--help"])
            .output()
            .expect("--help");
        assert!(out.status.success(), "{cmd} --help");
        help.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    // Not ours: bpf-linker's, named where the doc explains a choice.
    let foreign = ["--cpu"];
    let mut unknown = BTreeSet::new();
    let mut checked = 0;
    for span in spans(&architecture()) {
        let Some(rest) = span.strip_prefix("--") else {
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        let flag = format!("--{name}");
        if foreign.contains(&flag.as_str()) {
            continue;
        }
        checked += 1;
        let taken = help
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .any(|w| w == flag);
        if !taken {
            unknown.insert(flag);
        }
    }
    assert!(checked >= 10, "only {checked} flags found");
    assert!(
        unknown.is_empty(),
        "ARCHITECTURE.md names flags no command takes: {unknown:?}"
    );
}

/// `pub struct Name { pub field: T, ... }` in balancer-common: its fields
/// without padding.
fn struct_fields(src: &str, name: &str) -> Option<BTreeSet<String>> {
    let start = src.find(&format!("pub struct {name} {{"))?;
    let body = &src[start..];
    let body = &body[body.find('{')? + 1..body.find("\n}")?];
    Some(
        body.lines()
            .filter_map(|l| {
                let l = l.trim();
                let f = l.strip_prefix("pub ")?.split(':').next()?.trim();
                (!f.starts_with('_')).then(|| f.to_owned())
            })
            .collect(),
    )
}

#[test]
fn the_maps_and_shared_types_architecture_spells_out_are_the_code() {
    let doc = architecture();
    let common = std::fs::read_to_string(root().join("balancer-common/src/lib.rs"))
        .expect("balancer-common");
    // The map table: every `NAME` in its first column is a map name.
    let maps: Vec<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(str::to_owned)
        .collect();
    assert!(maps.len() >= 15, "{maps:?}");
    for m in &maps {
        assert!(
            common.contains(&format!("pub const {m}: &str = \"{m}\";")),
            "ARCHITECTURE.md's map {m} is not in balancer_common::map_names"
        );
    }
    // `Type {a, b[4], c}` for a struct of balancer-common: those fields.
    let mut checked = 0;
    for span in spans(&doc) {
        let Some((name, rest)) = span.split_once(" {") else {
            continue;
        };
        if !name.chars().all(|c| c.is_ascii_alphanumeric()) {
            continue;
        }
        let Some(want) = struct_fields(&common, name) else {
            continue;
        };
        let listed: BTreeSet<String> = rest
            .trim_end_matches('}')
            .split(',')
            .map(|f| f.trim().split('[').next().unwrap_or("").to_owned())
            .filter(|f| !f.is_empty())
            .collect();
        assert_eq!(
            listed, want,
            "ARCHITECTURE.md spells `{span}`, the code's {name} has {want:?}"
        );
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} types checked");
}
