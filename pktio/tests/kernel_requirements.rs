//! The kernel a node needs is stated in one place: the top-level README's "What a node
//! needs". Elsewhere (other READMEs, manifests, code comments, error messages) a kernel
//! version may be named only if that section names it too, and a minimum ("X or later",
//! "X and later", "X+") may not be stated at all: it would drift from the one place, as
//! three different minimums once did.
//!
//! Pure: reads the repository's text files, needs no root.

use std::fs;
use std::path::{Path, PathBuf};

/// The section of README.md that states what a node needs.
const SECTION: &str = "## What a node needs";

/// Files read: documentation, code, manifests and scripts.
fn is_text(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    matches!(name, "Vagrantfile" | "Containerfile")
        || matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("md" | "rs" | "c" | "h" | "yaml" | "yml" | "sh" | "toml")
        )
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_str().unwrap_or("");
        if path.is_dir() {
            // Build output and history are not the project's text.
            if !matches!(name, "target" | ".git") && !name.starts_with('.') {
                walk(&path, out);
            }
        } else if is_text(&path) {
            out.push(path);
        }
    }
}

/// A word that is a kernel version (`6.6`, `5.10`, `6.18.44-fc`), as "major.minor", and
/// whether it is written as a minimum (`5.6+`).
fn version(word: &str) -> Option<(String, bool)> {
    let w = word.trim_start_matches(['(', '`', '"', '*']);
    let w = w.trim_end_matches([')', ',', '.', ';', ':', '?', '`', '"', '*']);
    let plus = w.ends_with('+');
    let w = w.trim_end_matches('+');
    let w = w.split('-').next().unwrap_or("");
    let mut parts = w.split('.');
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    if parts.any(|p| p.parse::<u32>().is_err()) || !(3..=9).contains(&major) {
        return None;
    }
    Some((format!("{major}.{minor}"), plus))
}

fn bare(word: &str) -> String {
    word.trim_matches(|c: char| !c.is_alphanumeric())
        .to_lowercase()
}

/// Kernel versions named in `text`: (line, version, stated as a minimum). A version counts
/// when one of the three words before it (up to another version) is "Linux" or
/// "kernel(s)", or when it is followed by "or later" / "and later" / "or newer".
fn kernel_versions(text: &str) -> Vec<(usize, String, bool)> {
    let words: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .flat_map(|(n, line)| line.split_whitespace().map(move |w| (n + 1, w)))
        .collect();
    let mut found = Vec::new();
    for (i, &(line, word)) in words.iter().enumerate() {
        let Some((v, plus)) = version(word) else {
            continue;
        };
        // Looking back stops at another version: in "Linux 5.6+, iproute2 6.1" the
        // second is iproute2's.
        let kernel_before = words[i.saturating_sub(3)..i]
            .iter()
            .rev()
            .take_while(|(_, w)| version(w).is_none())
            .any(|(_, w)| matches!(bare(w).as_str(), "linux" | "kernel" | "kernels"));
        let after: Vec<String> = words[i + 1..(i + 3).min(words.len())]
            .iter()
            .map(|(_, w)| bare(w))
            .collect();
        let later = after.len() == 2
            && matches!(after[0].as_str(), "or" | "and")
            && matches!(after[1].as_str(), "later" | "newer");
        if kernel_before || later {
            found.push((line, v, plus || later));
        }
    }
    found
}

#[test]
fn kernel_versions_are_stated_in_one_place() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = fs::read_to_string(root.join("README.md")).expect("README.md");
    let start = readme
        .find(SECTION)
        .unwrap_or_else(|| panic!("README.md has no section {SECTION:?}"));
    let end = readme[start + SECTION.len()..]
        .find("\n## ")
        .map_or(readme.len(), |e| start + SECTION.len() + e);
    let section = &readme[start..end];
    let stated: Vec<String> = section
        .split_whitespace()
        .filter_map(|w| version(w).map(|(v, _)| v))
        .collect();
    assert!(
        stated.iter().any(|v| v == "6.6"),
        "the section states no kernel version"
    );

    let mut files = Vec::new();
    walk(&root, &mut files);
    let this = Path::new(file!()).file_name().expect("file name");
    let mut wrong = Vec::new();
    for path in files {
        if path.file_name() == Some(this) {
            continue;
        }
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let rel = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .display()
            .to_string();
        let text = if rel == "README.md" {
            // The section itself is the one place; the rest of README is not. Its lines
            // are blanked, so line numbers stay those of the file.
            let blank = "\n".repeat(section.matches('\n').count());
            format!("{}{blank}{}", &readme[..start], &readme[end..])
        } else {
            text
        };
        for (line, v, minimum) in kernel_versions(&text) {
            if minimum {
                wrong.push(format!(
                    "{rel}:{line}: states a minimum kernel ({v}): say it in README.md's \"What a node needs\" only"
                ));
            } else if !stated.contains(&v) {
                wrong.push(format!(
                    "{rel}:{line}: names kernel {v}, which README.md's \"What a node needs\" does not"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_scanner_finds_versions_and_minimums() {
    let found = kernel_versions(
        "needs Linux 6.6 (tcx)\nkernels\n5.11 or\nlater, ethtool (Linux 5.6+)\niproute2 6.1 and bpftool 7.1, kube-proxy 1.35, Linux 6.18.44-fc",
    );
    assert_eq!(
        found,
        vec![
            (1, "6.6".to_string(), false),
            (3, "5.11".to_string(), true),
            (4, "5.6".to_string(), true),
            (5, "6.18".to_string(), false),
        ]
    );
}
