//! Every object of every shared case (`../shared/cases`, or the folder named by
//! `KXDP_CASES`) goes through the store and the table computation without an error: the
//! cases are written as users write objects, so this checks the parsing and the defaults
//! against real shapes. What the tables do with traffic is the dataplane's case runner's.

use std::path::PathBuf;

use control::{compute_with_warnings, Objects};
use serde_yaml::Value;

/// The folder, and whether it was asked for (then it must exist).
fn cases_dir() -> (PathBuf, bool) {
    match std::env::var_os("KXDP_CASES") {
        Some(dir) => (PathBuf::from(dir), true),
        None => (
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/cases"),
            false,
        ),
    }
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

#[test]
fn every_case_loads_and_computes() {
    let (dir, asked) = cases_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        assert!(!asked, "KXDP_CASES={} cannot be read", dir.display());
        eprintln!("no cases at {}: nothing to check", dir.display());
        return;
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.yaml case in {}", dir.display());
    let mut failures = Vec::new();
    for file in &files {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(file).expect("readable case");
        let case: Value = serde_yaml::from_str(&text).expect("case is YAML");
        let node = str_at(&case, "node")
            .expect("case names its node")
            .to_string();
        let mut objects = Objects::new();
        let mut batches = vec![case.get("objects").cloned()];
        let steps = case
            .get("steps")
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default();
        batches.extend(steps.iter().map(|s| s.get("apply").cloned()));
        for (step, batch) in batches.into_iter().enumerate() {
            for (i, obj) in batch
                .iter()
                .filter_map(Value::as_sequence)
                .flatten()
                .enumerate()
            {
                if let Err(e) = objects.apply_document(obj.clone(), &name) {
                    failures.push(format!("{name} step {step} object {i}: {e}"));
                }
            }
            if step > 0 {
                for d in steps[step - 1]
                    .get("delete")
                    .and_then(Value::as_sequence)
                    .into_iter()
                    .flatten()
                {
                    let kind = str_at(d, "kind").unwrap_or("");
                    let ns = str_at(d, "namespace").unwrap_or("");
                    let obj = str_at(d, "name").unwrap_or("");
                    if !objects.delete(kind, ns, obj) {
                        failures.push(format!(
                            "{name} step {step}: delete {kind} {ns}/{obj}: not there"
                        ));
                    }
                }
            }
            match compute_with_warnings(&objects, &node, &Default::default()) {
                Ok(c) => {
                    for w in c.warnings {
                        failures.push(format!("{name} step {step}: warning {w}"));
                    }
                }
                Err(e) => failures.push(format!("{name} step {step}: {e}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases:\n{}",
        files.len(),
        failures.join("\n")
    );
}
