//! The manifest-directory source: every `*.yaml`, `*.yml` and `*.json` file of a folder
//! (not its subfolders), in name order, multi-document YAML allowed — what
//! `kubectl apply -f DIR` would read.
//!
//! A malformed document is reported with its file, its index in the file and the field that
//! is wrong, and every other document is still applied: one bad file never takes the
//! node's Services down. Documents are split on `---` lines before parsing, so even a YAML
//! syntax error loses only its own document, not the rest of the file.
//!
//! [`fingerprint`] is the cheap change detector a caller polls: names, sizes, inode and
//! modification and change times of the manifest files, read with one `stat` each.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::objects::{ObjectError, Objects};

/// A manifest that could not be read or applied.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The directory itself cannot be listed: nothing was loaded.
    #[error("manifest directory {}: {source}: check the path given to --manifests", .dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why it cannot be listed.
        source: io::Error,
    },
    /// A file cannot be read (the other files are loaded).
    #[error("{file}: cannot read it: {source}")]
    Unreadable {
        /// The file name.
        file: String,
        /// Why.
        source: io::Error,
    },
    /// A document is not valid YAML (the other documents are loaded).
    #[error("{file} document {document}: not valid YAML at line {line}: {message}")]
    Syntax {
        /// The file name.
        file: String,
        /// Index of the document in the file, from 1.
        document: usize,
        /// Line in the file, from 1.
        line: usize,
        /// What the parser says.
        message: String,
    },
    /// A document is YAML but not an object control can take.
    #[error("{file} document {document}: {error}")]
    Document {
        /// The file name.
        file: String,
        /// Index of the document in the file, from 1 (empty documents are not counted).
        document: usize,
        /// What was wrong with it.
        error: ObjectError,
    },
}

/// What [`load_dir`] read: the objects of every valid document, and an error for every
/// file or document that could not be used.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The objects.
    pub objects: Objects,
    /// One entry per unusable file or document, in file and document order.
    pub errors: Vec<ManifestError>,
    /// Manifest files read.
    pub files: usize,
    /// Non-empty documents seen.
    pub documents: usize,
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'));
    // Dotfiles are editor swap files and the `..data` links of ConfigMap volumes.
    !hidden
        && path
            .extension()
            .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
        && path.is_file()
}

/// The manifest files of `dir`, sorted by name.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ManifestError::Dir {
        dir: dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_manifest(p))
        .collect();
    files.sort();
    Ok(files)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Reads every manifest of `dir` into a fresh store. Fails only when the directory cannot
/// be listed; bad files and documents are in [`Loaded::errors`].
pub fn load_dir(dir: &Path) -> Result<Loaded, ManifestError> {
    let mut loaded = Loaded::default();
    for path in manifest_files(dir)? {
        let file = file_name(&path);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                loaded.files += 1;
                loaded.documents +=
                    load_text(&mut loaded.objects, &file, &text, &mut loaded.errors);
            }
            Err(source) => loaded
                .errors
                .push(ManifestError::Unreadable { file, source }),
        }
    }
    Ok(loaded)
}

/// One document of a YAML stream, before parsing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawDocument {
    /// Index among the file's non-empty documents, from 1.
    pub index: usize,
    /// Line of the file the document's text starts on, from 1.
    pub first_line: usize,
    /// The text.
    pub text: String,
}

fn is_marker(line: &str, marker: &str) -> Option<usize> {
    let rest = line.strip_prefix(marker)?;
    match rest.chars().next() {
        None => Some(marker.len()),
        Some(c) if c.is_whitespace() => Some(marker.len()),
        _ => None,
    }
}

fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || l.starts_with('%')
    })
}

/// Splits a YAML stream into its documents at `---` and `...` lines (a marker at column 0
/// cannot occur inside a document, even in a block scalar), dropping empty ones.
pub fn split_documents(text: &str) -> Vec<RawDocument> {
    fn flush(chunk: &mut String, first_line: usize, out: &mut Vec<RawDocument>) {
        if !is_blank(chunk) {
            out.push(RawDocument {
                index: out.len() + 1,
                first_line,
                text: std::mem::take(chunk),
            });
        }
        chunk.clear();
    }
    let mut out = Vec::new();
    let mut chunk = String::new();
    let mut first_line = 1;
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        if let Some(len) = is_marker(line, "---") {
            flush(&mut chunk, first_line, &mut out);
            // `--- {a: 1}`: the document starts on the marker's line; pad to keep columns.
            chunk.push_str(&" ".repeat(len));
            chunk.push_str(&line[len..]);
            chunk.push('\n');
            first_line = number;
        } else if is_marker(line, "...").is_some() {
            flush(&mut chunk, first_line, &mut out);
            first_line = number + 1;
        } else {
            if chunk.is_empty() {
                first_line = number;
            }
            chunk.push_str(line);
            chunk.push('\n');
        }
    }
    flush(&mut chunk, first_line, &mut out);
    out
}

/// Applies every document of one file's text to `objects`, pushing an error for each bad
/// one; returns the number of non-empty documents.
pub fn load_text(
    objects: &mut Objects,
    file: &str,
    text: &str,
    errors: &mut Vec<ManifestError>,
) -> usize {
    let docs = split_documents(text);
    for doc in &docs {
        let value: serde_yaml::Value = match serde_yaml::from_str(&doc.text) {
            Ok(v) => v,
            Err(e) => {
                let (line, message) = match e.location() {
                    Some(at) => {
                        let full = e.to_string();
                        let message = full
                            .rfind(" at line ")
                            .map_or(full.as_str(), |cut| &full[..cut])
                            .to_string();
                        (doc.first_line + at.line().saturating_sub(1), message)
                    }
                    None => (doc.first_line, e.to_string()),
                };
                errors.push(ManifestError::Syntax {
                    file: file.to_string(),
                    document: doc.index,
                    line,
                    message,
                });
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        let origin = format!("{file} document {}", doc.index);
        if let Err(e) = objects.apply_document(value, &origin) {
            errors.extend(
                e.flatten()
                    .into_iter()
                    .map(|error| ManifestError::Document {
                        file: file.to_string(),
                        document: doc.index,
                        error,
                    }),
            );
        }
    }
    docs.len()
}

/// What [`fingerprint`] sees of one file.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    name: PathBuf,
    len: u64,
    inode: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// A summary of a manifest directory that changes whenever a manifest is added, removed,
/// replaced or written (names, sizes, inodes, modification and change times).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint(Vec<FileStamp>);

/// Stats the manifests of `dir`. Two equal fingerprints mean nothing worth re-reading
/// changed; a file that vanishes between listing and `stat` simply counts as changed.
pub fn fingerprint(dir: &Path) -> Result<Fingerprint, ManifestError> {
    let stamps = manifest_files(dir)?
        .into_iter()
        .map(|p| {
            let md = std::fs::metadata(&p).ok();
            FileStamp {
                len: md.as_ref().map_or(0, |m| m.len()),
                inode: md.as_ref().map_or(0, |m| m.ino()),
                mtime: md.as_ref().map_or((0, 0), |m| (m.mtime(), m.mtime_nsec())),
                ctime: md.as_ref().map_or((0, 0), |m| (m.ctime(), m.ctime_nsec())),
                name: p,
            }
        })
        .collect();
    Ok(Fingerprint(stamps))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: &str, text: &str) -> (Objects, Vec<String>) {
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        load_text(&mut objects, file, text, &mut errors);
        (objects, errors.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn a_bad_document_is_reported_with_file_and_field_and_the_rest_applied() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: good, namespace: default}
spec:
  clusterIP: 172.30.0.1
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: default}
spec:
  ports: [{port: eighty}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
---
apiVersion: v1
kind: Service
metadata: {name: also-good}
spec: {clusterIP: 172.30.0.2, ports: [{port: 80}]}
"#;
        let (objects, errors) = load("services.yaml", text);
        assert_eq!(objects.services().count(), 2);
        assert_eq!(
            errors,
            ["services.yaml document 2: spec.ports[0].port: invalid type: string \"eighty\", expected i32"]
        );
    }

    #[test]
    fn a_syntax_error_loses_only_its_document() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: [b\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: c}\n";
        let (objects, errors) = load("ns.yaml", text);
        assert_eq!(objects.namespaces().count(), 2);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("ns.yaml document 2: not valid YAML at line "),
            "{errors:?}"
        );
    }

    #[test]
    fn documents_are_numbered_without_empty_ones() {
        let docs = split_documents("# header\n---\na: 1\n---\n---\n--- {b: 2}\n...\nc: 3\n");
        let got: Vec<(usize, usize, &str)> = docs
            .iter()
            .map(|d| (d.index, d.first_line, d.text.trim()))
            .collect();
        assert_eq!(got, [(1, 2, "a: 1"), (2, 6, "{b: 2}"), (3, 8, "c: 3")]);
    }

    #[test]
    fn list_and_json_documents() {
        let (objects, errors) = load(
            "l.yaml",
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n- {apiVersion: v1, kind: Namespace, metadata: {name: b}}\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(objects.namespaces().count(), 2);
        let (objects, errors) = load(
            "n.json",
            r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}"#,
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert!(objects.node("node-a").is_some());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let (objects, errors) = load(
            "x.yaml",
            "metadata: {name: x}\n---\n[1, 2]\n---\n: :\n---\n\"\n",
        );
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(objects.is_empty());
    }

    #[test]
    fn directory_load_and_fingerprint() {
        let dir = std::env::temp_dir().join(format!("kxdp-control-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).expect("write");
        write(
            "b.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n",
        );
        write(
            "a.yml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: x}]}\n",
        );
        write("notes.txt", "not a manifest");
        write(".swap.yaml", "[");
        let loaded = load_dir(&dir).expect("listable");
        assert_eq!((loaded.files, loaded.documents), (2, 2));
        assert_eq!(loaded.objects.namespaces().count(), 1);
        assert_eq!(loaded.errors.len(), 1);
        assert!(loaded.errors[0]
            .to_string()
            .starts_with("a.yml document 1: spec.ports[0].port"));

        let before = fingerprint(&dir).expect("listable");
        assert_eq!(before, fingerprint(&dir).expect("listable"));
        write("c.json", "{}");
        let after = fingerprint(&dir).expect("listable");
        assert_ne!(before, after);
        std::fs::remove_dir_all(&dir).expect("clean up");
        assert!(matches!(load_dir(&dir), Err(ManifestError::Dir { .. })));
    }
}
