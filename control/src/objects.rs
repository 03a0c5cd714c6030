//! The Kubernetes objects control knows, keyed by kind, namespace and name, with the API
//! server's defaults applied (objects arrive as users write them).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::de::DeserializeOwned;

/// Why an object could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// A field has the wrong shape; `path` says which (`spec.ports[0].port`).
    #[error("{path}: {message}")]
    Field {
        /// Where in the object.
        path: String,
        /// What was wrong.
        message: String,
    },
    /// The document has no `kind` or `metadata.name`.
    #[error("{0}")]
    Shape(String),
}

/// `(namespace, name)`; the namespace is empty for cluster-scoped kinds.
pub type Key = (String, String);

/// Every object control holds.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods.
    pub pods: BTreeMap<Key, Pod>,
    /// Services.
    pub services: BTreeMap<Key, Service>,
    /// EndpointSlices.
    pub endpoint_slices: BTreeMap<Key, EndpointSlice>,
    /// NetworkPolicies.
    pub network_policies: BTreeMap<Key, NetworkPolicy>,
}

/// What [`Objects::apply`] did with a document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Stored under this kind and key.
    Stored(String, Key),
    /// A kind control does not use; ignored.
    Ignored(String),
}

fn parse<T: DeserializeOwned>(value: serde_yaml::Value) -> Result<T, ObjectError> {
    serde_path_to_error::deserialize(value).map_err(|e| ObjectError::Field {
        path: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

fn namespaced(
    md: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<Key, ObjectError> {
    let name = md
        .name
        .clone()
        .ok_or_else(|| ObjectError::Shape("metadata.name is missing".into()))?;
    Ok((
        md.namespace.clone().unwrap_or_else(|| "default".into()),
        name,
    ))
}

impl Objects {
    /// Stores one object (a parsed YAML or JSON document), replacing one of the same kind
    /// and key. `List` documents apply each item.
    pub fn apply(&mut self, value: serde_yaml::Value) -> Result<Vec<Applied>, ObjectError> {
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| ObjectError::Shape("kind is missing".into()))?
            .to_string();
        let mut out = Vec::new();
        match kind.as_str() {
            "List" => {
                let items = value
                    .get("items")
                    .and_then(|i| i.as_sequence())
                    .cloned()
                    .unwrap_or_default();
                for (i, item) in items.into_iter().enumerate() {
                    let applied = self.apply(item).map_err(|e| match e {
                        ObjectError::Field { path, message } => ObjectError::Field {
                            path: format!("items[{i}].{path}"),
                            message,
                        },
                        ObjectError::Shape(m) => ObjectError::Shape(format!("items[{i}]: {m}")),
                    })?;
                    out.extend(applied);
                }
            }
            "Node" => {
                let n: Node = parse(value)?;
                let name = n
                    .metadata
                    .name
                    .clone()
                    .ok_or_else(|| ObjectError::Shape("metadata.name is missing".into()))?;
                self.nodes.insert(name.clone(), n);
                out.push(Applied::Stored(kind, (String::new(), name)));
            }
            "Namespace" => {
                let n: Namespace = parse(value)?;
                let name = n
                    .metadata
                    .name
                    .clone()
                    .ok_or_else(|| ObjectError::Shape("metadata.name is missing".into()))?;
                self.namespaces.insert(name.clone(), n);
                out.push(Applied::Stored(kind, (String::new(), name)));
            }
            "Pod" => {
                let p: Pod = parse(value)?;
                let key = namespaced(&p.metadata)?;
                self.pods.insert(key.clone(), p);
                out.push(Applied::Stored(kind, key));
            }
            "Service" => {
                let s: Service = parse(value)?;
                let key = namespaced(&s.metadata)?;
                self.services.insert(key.clone(), s);
                out.push(Applied::Stored(kind, key));
            }
            "EndpointSlice" => {
                let s: EndpointSlice = parse(value)?;
                let key = namespaced(&s.metadata)?;
                self.endpoint_slices.insert(key.clone(), s);
                out.push(Applied::Stored(kind, key));
            }
            "NetworkPolicy" => {
                let p: NetworkPolicy = parse(value)?;
                let key = namespaced(&p.metadata)?;
                self.network_policies.insert(key.clone(), p);
                out.push(Applied::Stored(kind, key));
            }
            _ => out.push(Applied::Ignored(kind)),
        }
        Ok(out)
    }

    /// Removes an object; returns whether it was there.
    pub fn delete(&mut self, kind: &str, namespace: &str, name: &str) -> bool {
        let key = (namespace.to_string(), name.to_string());
        match kind {
            "Node" => self.nodes.remove(name).is_some(),
            "Namespace" => self.namespaces.remove(name).is_some(),
            "Pod" => self.pods.remove(&key).is_some(),
            "Service" => self.services.remove(&key).is_some(),
            "EndpointSlice" => self.endpoint_slices.remove(&key).is_some(),
            "NetworkPolicy" => self.network_policies.remove(&key).is_some(),
            _ => false,
        }
    }

    /// Number of objects held.
    pub fn len(&self) -> usize {
        self.nodes.len()
            + self.namespaces.len()
            + self.pods.len()
            + self.services.len()
            + self.endpoint_slices.len()
            + self.network_policies.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Applies one YAML value; the error names `origin` (a file, a case).
pub fn apply_value(
    objects: &mut Objects,
    value: &serde_yaml::Value,
    origin: &str,
) -> Result<Vec<Applied>, crate::ManifestError> {
    objects
        .apply(value.clone())
        .map_err(|e| crate::ManifestError {
            file: origin.to_string(),
            document: 0,
            error: e,
        })
}
