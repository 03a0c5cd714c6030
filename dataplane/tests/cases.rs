//! The Service and NetworkPolicy cases, run through the in-memory pipeline.
//!
//! Every `*.yaml` in `../shared/cases` (or, instead, the folder named by `KXDP_CASES`) and
//! every `*.yaml` in this crate's own `tests/cases` is one scenario (format: the shared
//! folder's README). The own folder always runs: it holds the cases written here for
//! kube-proxy behaviour the shared ones do not cover (`svc-*`, `netpol-*`). `KXDP_CASE`
//! names one case to run alone. Objects go through control's table computation, the
//! tables into a dataplane whose ports are an in-memory device, and each probe becomes
//! real frames: the pipeline's output is delivered to simulated pods and hosts, which reply.
//!
//! `tests/expected-failures.txt` lists the cases that cannot pass yet, each with the issue
//! that will make it pass. The test fails when an unlisted case fails, and also when a
//! listed case passes, so the list only ever shrinks.

mod world;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use world::{Case, World};

/// The shared cases, or the folder `KXDP_CASES` names instead.
fn shared_dir() -> PathBuf {
    match std::env::var_os("KXDP_CASES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/cases"),
    }
}

/// This crate's own cases.
fn own_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases")
}

/// The case files of one folder, sorted; a folder that is missing or empty is an error.
fn case_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        panic!(
            "no cases folder at {} (set KXDP_CASES to a folder of cases)",
            dir.display()
        );
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no cases in {}", dir.display());
    files
}

fn expected_failures() -> BTreeMap<String, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/expected-failures.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.splitn(2, char::is_whitespace);
        let name = parts.next().unwrap_or_default().to_string();
        let why = parts.next().unwrap_or_default().trim().to_string();
        assert!(
            why.starts_with('#'),
            "expected-failures.txt: `{line}` must name the issue that fixes it (`name #N why`)"
        );
        out.insert(name, why);
    }
    out
}

/// Runs one case file; `Err` says which step and probe failed and how.
fn run_case(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("read: {e}"))?;
    let case: Case = serde_yaml::from_str(&text).map_err(|e| format!("parse: {e}"))?;
    let mut world = World::new(&case)?;
    world.run(&case)
}

#[test]
fn shared_cases() {
    let mut dirs = vec![shared_dir(), own_dir()];
    // `KXDP_CASES` naming the own folder runs it once.
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(&dirs[0], &dirs[1]) {
        dirs.pop();
    }
    let files: Vec<PathBuf> = dirs.iter().flat_map(|d| case_files(d)).collect();
    // A name in both folders (a case of ours adopted by the shared folder) runs twice;
    // expected-failures.txt, which goes by name, covers both.
    let mut names = BTreeSet::new();
    for f in &files {
        let name = f.file_stem().map(|s| s.to_string_lossy().into_owned());
        if !names.insert(name.unwrap_or_default()) {
            println!(
                "note  {} has the name of a case in another folder",
                f.display()
            );
        }
    }
    let expected = expected_failures();
    let only = std::env::var("KXDP_CASE").ok();
    let mut unexpected = Vec::new();
    let mut fixed = Vec::new();
    let (mut passed, mut failed_as_expected) = (0, 0);
    let mut seen = Vec::new();
    for file in &files {
        let name = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if only.as_ref().is_some_and(|o| *o != name) {
            continue;
        }
        seen.push(name.clone());
        let result = std::panic::catch_unwind(|| run_case(file))
            .unwrap_or_else(|_| Err("the runner panicked".to_string()));
        match (result, expected.get(&name)) {
            (Ok(()), None) => {
                passed += 1;
                println!("pass  {name}");
            }
            (Ok(()), Some(why)) => {
                println!("FIXED {name} (listed: {why}) — remove it from expected-failures.txt");
                fixed.push(name);
            }
            (Err(e), Some(why)) => {
                failed_as_expected += 1;
                println!("xfail {name} ({why}): {e}");
            }
            (Err(e), None) => {
                println!("FAIL  {name}: {e}");
                unexpected.push(format!("{name}: {e}"));
            }
        }
    }
    println!(
        "{} cases from {}: {passed} passed, {failed_as_expected} expected failures, {} unexpected failures, {} listed but passing",
        seen.len(),
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(" and "),
        unexpected.len(),
        fixed.len()
    );
    assert!(
        unexpected.is_empty() && fixed.is_empty(),
        "unexpected failures: {unexpected:#?}\nlisted in expected-failures.txt but passing: {fixed:?}"
    );
}
