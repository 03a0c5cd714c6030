//! The manifest-directory source: every `*.yaml`, `*.yml` and `*.json` file of a folder
//! (not its subfolders), in name order, multi-document YAML allowed — what
//! `kubectl apply -f DIR` would read.
//!
//! A malformed document is reported with its file, its index in the file and the field that
//! is wrong, and every other document is still applied: one bad file never takes the
//! node's Services down. Documents are split on `---` lines before parsing, so even a YAML
//! syntax error loses only its own document, not the rest of the file.
//!
//! A file that stops parsing keeps its last good version ([`ManifestDir`]): a file caught
//! half-written by a writer that does not rename into place must not take the objects of
//! its cut documents away. Entries named like manifests that are not regular files
//! (FIFOs, devices, symbolic link loops) are reported, never opened.
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
    #[error("{file} document {document}: {error} (the document starts at line {line})")]
    Document {
        /// The file name.
        file: String,
        /// Index of the document in the file, from 1 (empty documents are not counted).
        document: usize,
        /// Line of the file the document starts on, from 1.
        line: usize,
        /// What was wrong with it.
        error: ObjectError,
    },
    /// A directory entry named like a manifest that is not a regular file (nor a link to
    /// one): it is not read.
    #[error("{file}: {what}, not a regular file")]
    NotAFile {
        /// The entry's name.
        file: String,
        /// What it is ("a named pipe (FIFO)", "a symbolic link loop", ...).
        what: String,
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
    /// Files whose last good version was applied instead of their current text.
    pub kept: Vec<Kept>,
    /// Manifest files read.
    pub files: usize,
    /// Non-empty documents seen.
    pub documents: usize,
}

/// Whether the name is a manifest's: `*.yaml`, `*.yml` or `*.json`, not a dotfile.
fn is_manifest_name(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'));
    // Dotfiles are editor swap files and the `..data` links of ConfigMap volumes.
    !hidden
        && path
            .extension()
            .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
}

/// What a manifest-named entry that is not a regular file is, or `None` for a regular file
/// (or a link to one). Only `stat`s it: a FIFO is never opened (that would block).
fn not_a_file(path: &Path) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    let md = match std::fs::metadata(path) {
        Ok(md) => md,
        // ELOOP: too many levels of symbolic links.
        Err(e) if e.raw_os_error() == Some(40) => return Some("a symbolic link loop".into()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Gone since the listing, or a link to nothing.
            return std::fs::symlink_metadata(path)
                .is_ok()
                .then(|| "a symbolic link to nothing".into());
        }
        Err(e) => return Some(format!("cannot stat it ({e})")),
    };
    let t = md.file_type();
    let what = if t.is_file() {
        return None;
    } else if t.is_dir() {
        "a directory (subdirectories are not read)"
    } else if t.is_fifo() {
        "a named pipe (FIFO)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Some(what.into())
}

/// The manifest-named entries of a directory: the files to read, and the others with what
/// they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// Regular files (or links to them), sorted by name.
    pub files: Vec<PathBuf>,
    /// Entries named like manifests that are something else, sorted by name.
    pub skipped: Vec<(String, String)>,
}

/// Lists the manifest-named entries of `dir` (not its subdirectories').
pub fn list(dir: &Path) -> Result<Listing, ManifestError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ManifestError::Dir {
        dir: dir.to_owned(),
        source,
    })?;
    let mut listing = Listing::default();
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        if !is_manifest_name(&path) {
            continue;
        }
        match not_a_file(&path) {
            None => listing.files.push(path),
            Some(what) => listing.skipped.push((file_name(&path), what)),
        }
    }
    listing.files.sort();
    listing.skipped.sort();
    Ok(listing)
}

/// The manifest files of `dir`, sorted by name.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    Ok(list(dir)?.files)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Reads every manifest of `dir` into a fresh store, once, with no earlier version to
/// fall back on. Fails only when the directory cannot be listed; bad files and documents
/// are in [`Loaded::errors`].
pub fn load_dir(dir: &Path) -> Result<Loaded, ManifestError> {
    ManifestDir::new(dir).load()
}

/// Why a file's last good version was used instead of what it holds now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeptBecause {
    /// Some of its documents do not parse (they are in [`Loaded::errors`]).
    Errors(usize),
    /// It is empty: taken for a file being written (delete a file to remove its objects).
    Empty,
    /// It cannot be read (in [`Loaded::errors`]).
    Unreadable,
}

/// A file whose last good version was applied instead of its current text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kept {
    /// The file name.
    pub file: String,
    /// Why.
    pub because: KeptBecause,
}

impl std::fmt::Display for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = match &self.because {
            KeptBecause::Errors(1) => "1 document does not parse".to_string(),
            KeptBecause::Errors(n) => format!("{n} documents do not parse"),
            KeptBecause::Empty => "it is empty (delete it to remove its objects)".into(),
            KeptBecause::Unreadable => "it cannot be read".into(),
        };
        write!(
            f,
            "{}: {why}; keeping its last good version until it does (a half-written file? write manifests to a temporary file and rename it into place)",
            self.file
        )
    }
}

/// A manifest directory read again on every change, that remembers each file's last
/// version without errors: a file that stops parsing (half-written by a non-atomic
/// writer, or a bad edit) keeps that version's objects, rather than losing the objects
/// of the documents that broke. A file seen broken from the start has only its good
/// documents applied.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    /// Text of each file's last version that loaded without errors, by file name.
    last_good: std::collections::BTreeMap<String, String>,
}

impl ManifestDir {
    /// The directory at `dir`; nothing is read yet.
    pub fn new(dir: &Path) -> ManifestDir {
        ManifestDir {
            dir: dir.to_owned(),
            last_good: Default::default(),
        }
    }

    /// Reads every manifest into a fresh store, falling back on a file's last good
    /// version where it has errors now. Fails only when the directory cannot be listed.
    pub fn load(&mut self) -> Result<Loaded, ManifestError> {
        let listing = list(&self.dir)?;
        let mut loaded = Loaded::default();
        loaded.errors.extend(
            listing
                .skipped
                .into_iter()
                .map(|(file, what)| ManifestError::NotAFile { file, what }),
        );
        let mut seen = std::collections::BTreeSet::new();
        for path in listing.files {
            let file = file_name(&path);
            seen.insert(file.clone());
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                // Removed since the listing: as if it had not been listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    seen.remove(&file);
                    continue;
                }
                Err(source) => {
                    loaded.errors.push(ManifestError::Unreadable {
                        file: file.clone(),
                        source,
                    });
                    self.keep(&file, KeptBecause::Unreadable, &mut loaded);
                    continue;
                }
            };
            loaded.files += 1;
            let mut scratch = Objects::default();
            let mut errors = Vec::new();
            let documents = load_text(&mut scratch, &file, &text, &mut errors);
            loaded.documents += documents;
            let because = if !errors.is_empty() {
                Some(KeptBecause::Errors(errors.len()))
            } else if documents == 0 && text.trim().is_empty() {
                Some(KeptBecause::Empty)
            } else {
                None
            };
            loaded.errors.append(&mut errors);
            match because {
                Some(because) if self.last_good.contains_key(&file) => {
                    self.keep(&file, because, &mut loaded);
                }
                // Never good: what parses is applied (one bad document does not take
                // the others down); the errors were reported above.
                Some(_) => {
                    load_text(&mut loaded.objects, &file, &text, &mut Vec::new());
                }
                None => {
                    load_text(&mut loaded.objects, &file, &text, &mut Vec::new());
                    self.last_good.insert(file, text);
                }
            }
        }
        self.last_good.retain(|file, _| seen.contains(file));
        Ok(loaded)
    }

    /// Applies the last good version of `file`, if there is one, and says so.
    fn keep(&self, file: &str, because: KeptBecause, loaded: &mut Loaded) {
        if let Some(text) = self.last_good.get(file) {
            load_text(&mut loaded.objects, file, text, &mut Vec::new());
            loaded.kept.push(Kept {
                file: file.to_string(),
                because,
            });
        }
    }
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

impl RawDocument {
    /// The first line of the file that holds some of the document (not blank, not a
    /// comment): where an editor should jump to.
    pub fn content_line(&self) -> usize {
        let skip = self
            .text
            .lines()
            .take_while(|l| {
                let t = l.trim();
                t.is_empty() || t.starts_with('#')
            })
            .count();
        self.first_line + skip
    }
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
                        // The end of the input is the line after the last one when the
                        // text ends with a newline (one-line JSON cut short): say the
                        // last line.
                        let last = doc.first_line + doc.text.lines().count().max(1) - 1;
                        let line = doc.first_line + at.line().saturating_sub(1);
                        (line.min(last), message)
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
                        line: doc.content_line(),
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
/// replaced or written (names, sizes, inodes, modification and change times), or an entry
/// named like one that is not a regular file comes, goes or changes type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint(Vec<FileStamp>, Vec<(String, String)>);

/// Stats the manifests of `dir`. Two equal fingerprints mean nothing worth re-reading
/// changed; a file that vanishes between listing and `stat` simply counts as changed.
pub fn fingerprint(dir: &Path) -> Result<Fingerprint, ManifestError> {
    let listing = list(dir)?;
    let stamps = listing
        .files
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
    Ok(Fingerprint(stamps, listing.skipped))
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
            ["services.yaml document 2: spec.ports[0].port: invalid type: string \"eighty\", expected i32 (the document starts at line 9)"]
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
    fn errors_name_a_line_of_the_file_even_for_one_line_json() {
        let (_, errors) = load(
            "s.json",
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": "eighty"}]}}"#,
        );
        assert_eq!(
            errors,
            ["s.json document 1: spec.ports[0].port: invalid type: string \"eighty\", expected i32 (the document starts at line 1)"]
        );
        // Cut short: the parser stops after the end of the only line.
        let (_, errors) = load(
            "s.json",
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": "#,
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("s.json document 1: not valid YAML at line 1:"),
            "{errors:?}"
        );
        // A wrong type in a later document, after a comment: the line its text starts on.
        let (_, errors) = load(
            "s.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n# the web Service\n\napiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: 3}\n",
        );
        assert_eq!(
            errors,
            ["s.yaml document 2: spec.ports: invalid type: integer `3`, expected a sequence (the document starts at line 7)"]
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

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("kxdp-control-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec: {clusterIP: 172.30.0.10, ports: [{port: 80}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints:\n- addresses: [10.244.1.5]\n  conditions: {ready: true}\nports: [{port: 8080}]\n";

    fn slices(objects: &Objects) -> usize {
        objects.endpoint_slices().count()
    }

    fn first_address(objects: &Objects) -> Option<String> {
        let slice = objects.endpoint_slices().next()?;
        slice
            .endpoints
            .as_ref()?
            .first()?
            .addresses
            .first()
            .cloned()
    }

    #[test]
    fn a_file_that_stops_parsing_keeps_its_last_good_version() {
        let dir = temp_dir("last-good");
        let path = dir.join("web.yaml");
        let mut manifests = ManifestDir::new(&dir);
        std::fs::write(&path, WEB).expect("write");
        let loaded = manifests.load().expect("listable");
        assert!(loaded.errors.is_empty() && loaded.kept.is_empty());
        assert_eq!(
            (loaded.objects.services().count(), slices(&loaded.objects)),
            (1, 1)
        );

        // Cut in the middle of the EndpointSlice, as a writer that truncates first leaves it.
        let cut = WEB.find("10.244.1.5").expect("address") + 5;
        std::fs::write(&path, &WEB[..cut]).expect("write");
        let loaded = manifests.load().expect("listable");
        assert_eq!(loaded.errors.len(), 1, "{:?}", loaded.errors);
        assert_eq!(
            (loaded.objects.services().count(), slices(&loaded.objects)),
            (1, 1),
            "the slice stays"
        );
        assert_eq!(
            loaded.kept,
            [Kept {
                file: "web.yaml".into(),
                because: KeptBecause::Errors(1)
            }]
        );
        assert!(
            loaded.kept[0]
                .to_string()
                .contains("keeping its last good version"),
            "{}",
            loaded.kept[0]
        );
        // Truncated to nothing.
        std::fs::write(&path, "").expect("write");
        let loaded = manifests.load().expect("listable");
        assert_eq!(slices(&loaded.objects), 1);
        assert_eq!(loaded.kept[0].because, KeptBecause::Empty);

        // A good edit is taken, and becomes the version kept.
        let edited = WEB.replace("10.244.1.5", "10.244.1.6");
        std::fs::write(&path, &edited).expect("write");
        let loaded = manifests.load().expect("listable");
        assert!(loaded.errors.is_empty() && loaded.kept.is_empty());
        assert_eq!(
            first_address(&loaded.objects).as_deref(),
            Some("10.244.1.6")
        );
        std::fs::write(&path, &edited[..cut]).expect("write");
        let loaded = manifests.load().expect("listable");
        assert_eq!(
            first_address(&loaded.objects).as_deref(),
            Some("10.244.1.6")
        );

        // Deleting the file removes its objects; a file broken from the start has its
        // good documents applied.
        std::fs::remove_file(&path).expect("remove");
        assert!(manifests.load().expect("listable").objects.is_empty());
        std::fs::write(&path, &WEB[..cut]).expect("write");
        let loaded = manifests.load().expect("listable");
        assert_eq!(
            (loaded.objects.services().count(), slices(&loaded.objects)),
            (1, 0)
        );
        assert!(loaded.kept.is_empty());
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn entries_that_are_not_regular_files_are_reported_never_opened() {
        use std::os::unix::fs::symlink;
        let dir = temp_dir("odd-entries");
        std::fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        )
        .expect("write");
        let before = fingerprint(&dir).expect("listable");
        symlink("loop.yaml", dir.join("loop.yaml")).expect("symlink");
        symlink("/nonexistent/kxdp", dir.join("dangling.yml")).expect("symlink");
        symlink("/dev/null", dir.join("null.json")).expect("symlink");
        symlink("a.yaml", dir.join("link.yaml")).expect("symlink");
        std::fs::create_dir(dir.join("sub.yaml")).expect("mkdir");
        let status = std::process::Command::new("mkfifo")
            .arg(dir.join("pipe.yaml"))
            .status()
            .expect("mkfifo");
        assert!(status.success());
        // Not named like manifests: silent, as before.
        symlink("other.txt", dir.join("other.txt")).expect("symlink");
        assert_ne!(fingerprint(&dir).expect("listable"), before);

        // A FIFO opened for reading would block until a writer came: this returns.
        let loaded = load_dir(&dir).expect("listable");
        let said: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            said,
            [
                "dangling.yml: a symbolic link to nothing, not a regular file",
                "loop.yaml: a symbolic link loop, not a regular file",
                "null.json: a character device, not a regular file",
                "pipe.yaml: a named pipe (FIFO), not a regular file",
                "sub.yaml: a directory (subdirectories are not read), not a regular file",
            ]
        );
        // A link to a manifest is one.
        assert_eq!(loaded.files, 2);
        std::fs::remove_dir_all(&dir).expect("clean up");
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
