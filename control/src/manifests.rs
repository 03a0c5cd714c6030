//! The manifest-directory source: every `*.yaml`, `*.yml` and `*.json` file in a folder,
//! multi-document YAML allowed, read the way `kubectl apply -f DIR` reads it.
//!
//! A malformed document is reported with its file, its index and the field that is wrong,
//! and every other document is still applied: one bad file never takes the node's
//! Services down.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;

use crate::objects::{ObjectError, Objects};

/// A document that could not be applied.
#[derive(Debug, thiserror::Error)]
#[error("{file} document {document}: {error}")]
pub struct ManifestError {
    /// The file.
    pub file: String,
    /// Index of the document in the file, from 1.
    pub document: usize,
    /// What was wrong.
    pub error: ObjectError,
}

/// The manifest files of `dir`, sorted by name.
pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads every manifest in `dir`. Returns the objects of every valid document and an error
/// for every invalid one.
pub fn load_dir(dir: &Path) -> std::io::Result<(Objects, Vec<ManifestError>)> {
    let mut objects = Objects::default();
    let mut errors = Vec::new();
    for file in manifest_files(dir)? {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                errors.push(ManifestError {
                    file: name,
                    document: 0,
                    error: ObjectError::Shape(format!("unreadable: {e}")),
                });
                continue;
            }
        };
        load_text(&mut objects, &name, &text, &mut errors);
    }
    Ok((objects, errors))
}

/// Applies every document of one file's text.
pub fn load_text(objects: &mut Objects, file: &str, text: &str, errors: &mut Vec<ManifestError>) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                errors.push(ManifestError {
                    file: file.to_string(),
                    document,
                    error: ObjectError::Shape(format!("not YAML: {e}")),
                });
                // The parser cannot resynchronise after a syntax error: the rest of this
                // file is lost, the other files are not.
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        if let Err(error) = objects.apply(value) {
            errors.push(ManifestError {
                file: file.to_string(),
                document,
                error,
            });
        }
    }
}

/// A cheap fingerprint of a directory's manifests (names, sizes, modification times), to
/// poll for changes.
pub fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    manifest_files(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let md = std::fs::metadata(&p).ok();
            let len = md.as_ref().map(|m| m.len()).unwrap_or(0);
            let mtime = md.and_then(|m| m.modified().ok());
            (p, len, mtime)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
"#;
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        load_text(&mut objects, "svc.yaml", text, &mut errors);
        assert_eq!(objects.services.len(), 1);
        assert_eq!(errors.len(), 1);
        let msg = errors[0].to_string();
        assert!(
            msg.starts_with("svc.yaml document 2: spec.ports[0].port:"),
            "{msg}"
        );
    }

    #[test]
    fn list_documents_apply_each_item() {
        let text = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: a}}
- {apiVersion: v1, kind: Namespace, metadata: {name: b}}
"#;
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        load_text(&mut objects, "l.yaml", text, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(objects.namespaces.len(), 2);
    }

    #[test]
    fn missing_kind_is_an_error_not_a_panic() {
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        load_text(
            &mut objects,
            "x.yaml",
            "metadata: {name: x}\n---\n[1, 2]\n---\n: :\n",
            &mut errors,
        );
        assert!(errors.len() >= 2);
        assert!(objects.is_empty());
    }
}
