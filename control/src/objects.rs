//! The store of Kubernetes objects control knows, keyed by kind, namespace and name.
//!
//! Documents enter as parsed YAML or JSON ([`Objects::apply_document`]), are dispatched on
//! `apiVersion` and `kind`, parsed into the k8s-openapi types with the path of a bad field
//! kept, and given the API server's defaults ([`crate::defaults`]) before they are stored,
//! so everything downstream sees objects as a watch on the API server would deliver them.
//! Kinds control does not use are ignored with a log line: a manifest directory may hold a
//! whole application, not only what the dataplane needs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::defaults;

mod object;

pub use object::{Applied, Kind, Object, ObjectError};

/// `(namespace, name)`; the namespace is empty for cluster-scoped kinds.
type Key = (String, String);

/// Every object control holds, by kind, each kind ordered by namespace and name.
///
/// Each change also takes a *stamp* from one process-wide counter, so that whoever computes
/// from the store can tell what changed since it last looked without comparing objects
/// ([`crate::tables::TableComputer`]): the stamp of the last change to each kind, to each
/// Node, and to each Service *group* — a Service and the EndpointSlices labelled with its
/// name, whose endpoints it takes. Equal stamps mean equal objects, in any store of the
/// process (a cloned store shares its stamps until either changes, under its own id).
#[derive(Debug)]
pub struct Objects {
    /// Which store this is: a clone is another store (see its `Clone`).
    id: u64,
    nodes: BTreeMap<Key, Node>,
    namespaces: BTreeMap<Key, Namespace>,
    pods: BTreeMap<Key, Pod>,
    services: BTreeMap<Key, Service>,
    endpoint_slices: BTreeMap<Key, EndpointSlice>,
    network_policies: BTreeMap<Key, NetworkPolicy>,
    /// The last change to each kind, by [`Kind`] index.
    kind_stamps: [u64; 6],
    /// The last change to each Node (also its deletion).
    node_stamps: BTreeMap<Key, u64>,
    /// The last change to each Service group, by (namespace, Service name).
    group_stamps: HashMap<Key, u64>,
    /// The same, by stamp: which groups changed since a stamp is a range of this.
    group_log: BTreeMap<u64, Key>,
    /// Stamps up to this one may be missing from `group_log` (groups that went away
    /// entirely were forgotten): who last looked before it must look at every group.
    horizon: u64,
    /// The newest stamp of this store.
    last_stamp: u64,
    /// The EndpointSlices of each Service group, by (namespace, Service name).
    slices_by_service: BTreeMap<Key, BTreeSet<Key>>,
}

/// The source of stamps: one counter for every store, so stamps are never reused.
static STAMPS: AtomicU64 = AtomicU64::new(1);

fn next_stamp() -> u64 {
    STAMPS.fetch_add(1, Ordering::Relaxed)
}

/// A clone is another store with the same objects and stamps: it gets its own id, so a
/// [`crate::tables::TableComputer`] that saw one never takes the other's changes for the
/// continuation of its history (both may change on after the clone). Shared stamps keep a
/// computation that moves between them cheap: unchanged groups are still recognised.
impl Clone for Objects {
    fn clone(&self) -> Self {
        Objects {
            id: next_stamp(),
            nodes: self.nodes.clone(),
            namespaces: self.namespaces.clone(),
            pods: self.pods.clone(),
            services: self.services.clone(),
            endpoint_slices: self.endpoint_slices.clone(),
            network_policies: self.network_policies.clone(),
            kind_stamps: self.kind_stamps,
            node_stamps: self.node_stamps.clone(),
            group_stamps: self.group_stamps.clone(),
            group_log: self.group_log.clone(),
            horizon: self.horizon,
            last_stamp: self.last_stamp,
            slices_by_service: self.slices_by_service.clone(),
        }
    }
}

impl Default for Objects {
    fn default() -> Self {
        Objects {
            id: next_stamp(),
            nodes: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            services: BTreeMap::new(),
            endpoint_slices: BTreeMap::new(),
            network_policies: BTreeMap::new(),
            kind_stamps: [0; 6],
            node_stamps: BTreeMap::new(),
            group_stamps: HashMap::new(),
            group_log: BTreeMap::new(),
            horizon: 0,
            last_stamp: 0,
            slices_by_service: BTreeMap::new(),
        }
    }
}

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label), if any.
fn slice_service(slice: &EndpointSlice) -> Option<Key> {
    let service = slice
        .metadata
        .labels
        .as_ref()?
        .get(crate::labels::SERVICE_NAME_LABEL)
        .filter(|s| !s.is_empty())?;
    let (ns, _) = namespace_and_name(&slice.metadata);
    Some((ns.to_string(), service.clone()))
}

fn parse<T: DeserializeOwned>(kind: Kind, value: Value) -> Result<T, ObjectError> {
    serde_path_to_error::deserialize(value).map_err(|e| ObjectError::Field {
        kind,
        path: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

fn shape(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Sequence(_) => "sequence",
        Value::Mapping(_) => "mapping",
        Value::Tagged(_) => "tagged value",
    }
}

fn key(kind: Kind, namespace: &str, name: &str) -> Key {
    let ns = match (kind.is_namespaced(), namespace) {
        (false, _) => "",
        (true, "") => "default",
        (true, ns) => ns,
    };
    (ns.to_string(), name.to_string())
}

impl Objects {
    /// An empty store.
    pub fn new() -> Objects {
        Objects::default()
    }

    /// Stores one document (a parsed YAML or JSON value), replacing the object of the same
    /// kind, namespace and name; a `List` stores each of its items. `origin` (a file and
    /// document, a case name) only appears in the log line of an ignored kind: errors are
    /// about the document, and the caller knows where it came from.
    ///
    /// A `List` with bad items stores every good item and returns [`ObjectError::List`].
    pub fn apply_document(
        &mut self,
        mut value: Value,
        origin: &str,
    ) -> Result<Vec<Applied>, ObjectError> {
        if !value.is_mapping() {
            return Err(ObjectError::NotAnObject {
                found: shape(&value),
            });
        }
        value
            .apply_merge()
            .map_err(|e| ObjectError::Merge(e.to_string()))?;
        let kind_name = match value.get("kind") {
            Some(Value::String(k)) if !k.is_empty() => k.clone(),
            _ => return Err(ObjectError::MissingKind),
        };
        let api_version = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .map(str::to_string);
        if kind_name == "List" || (kind_name.ends_with("List") && value.get("items").is_some()) {
            return self.apply_list(value, origin);
        }
        let Some(kind) = Kind::from_name(&kind_name) else {
            let name = value
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("");
            log::info!(
                "{origin}: ignoring {}/{kind_name} {name}: kxdp does not use this kind",
                api_version.as_deref().unwrap_or("?"),
            );
            return Ok(vec![Applied::Ignored {
                api_version: api_version.unwrap_or_default(),
                kind: kind_name,
            }]);
        };
        match api_version.as_deref() {
            None | Some("") => return Err(ObjectError::MissingApiVersion { kind }),
            Some(v) if v != kind.api_version() => {
                return Err(ObjectError::WrongApiVersion {
                    kind,
                    got: v.to_string(),
                })
            }
            Some(_) => {}
        }
        let object = match kind {
            Kind::Node => Object::Node(parse(kind, value)?),
            Kind::Namespace => Object::Namespace(parse(kind, value)?),
            Kind::Pod => Object::Pod(parse(kind, value)?),
            Kind::Service => Object::Service(parse(kind, value)?),
            Kind::EndpointSlice => Object::EndpointSlice(parse(kind, value)?),
            Kind::NetworkPolicy => Object::NetworkPolicy(parse(kind, value)?),
        };
        Ok(vec![self.insert(object)?])
    }

    fn apply_list(&mut self, value: Value, origin: &str) -> Result<Vec<Applied>, ObjectError> {
        let items = match value.get("items") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Sequence(items)) => items.clone(),
            Some(other) => {
                return Err(ObjectError::ListItems {
                    found: shape(other),
                })
            }
        };
        let mut applied = Vec::new();
        let mut errors = Vec::new();
        for (index, item) in items.into_iter().enumerate() {
            match self.apply_document(item, &format!("{origin} items[{index}]")) {
                Ok(a) => applied.extend(a),
                Err(e) => errors.extend(e.flatten().into_iter().map(|error| ObjectError::Item {
                    index,
                    error: Box::new(error),
                })),
            }
        }
        if errors.is_empty() {
            Ok(applied)
        } else {
            Err(ObjectError::List(errors))
        }
    }

    /// Stores a typed object after applying the API server's defaults; a namespaced object
    /// without a namespace goes to `default`, as `kubectl apply` puts it.
    pub fn insert(&mut self, mut object: Object) -> Result<Applied, ObjectError> {
        let kind = object.kind();
        let md = object.metadata_mut();
        let name = match md.name.as_deref() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => return Err(ObjectError::MissingName { kind }),
        };
        let (namespace, name) = key(kind, md.namespace.as_deref().unwrap_or(""), &name);
        md.namespace = kind.is_namespaced().then(|| namespace.clone());
        let k = (namespace.clone(), name.clone());
        let stamp = self.stamp();
        self.kind_stamps[kind as usize] = stamp;
        match object {
            Object::Node(o) => {
                self.node_stamps.insert(k.clone(), stamp);
                self.nodes.insert(k, o);
            }
            Object::Namespace(mut o) => {
                defaults::namespace(&mut o);
                self.namespaces.insert(k, o);
            }
            Object::Pod(mut o) => {
                defaults::pod(&mut o);
                self.pods.insert(k, o);
            }
            Object::Service(mut o) => {
                defaults::service(&mut o);
                self.stamp_group(&k, stamp);
                self.services.insert(k, o);
            }
            Object::EndpointSlice(mut o) => {
                defaults::endpoint_slice(&mut o);
                let group = slice_service(&o);
                if let Some(g) = &group {
                    self.slices_by_service
                        .entry(g.clone())
                        .or_default()
                        .insert(k.clone());
                    self.stamp_group(g, stamp);
                }
                if let Some(old) = self.endpoint_slices.insert(k.clone(), o) {
                    if let Some(was) = slice_service(&old).filter(|was| Some(was) != group.as_ref())
                    {
                        // A stamp of its own: the log holds one group per stamp.
                        let left = self.stamp();
                        self.leave_group(&was, &k, left);
                    }
                }
            }
            Object::NetworkPolicy(mut o) => {
                defaults::network_policy(&mut o);
                self.network_policies.insert(k, o);
            }
        }
        Ok(Applied::Stored {
            kind,
            namespace,
            name,
        })
    }

    /// Removes an object; returns whether it was there. `kind` is written as in a manifest
    /// (`Service`); an empty namespace of a namespaced kind means `default`, and the
    /// namespace of a cluster-scoped kind is ignored.
    pub fn delete(&mut self, kind: &str, namespace: &str, name: &str) -> bool {
        let Some(kind) = Kind::from_name(kind) else {
            return false;
        };
        let k = key(kind, namespace, name);
        let removed = match kind {
            Kind::Node => self.nodes.remove(&k).is_some(),
            Kind::Namespace => self.namespaces.remove(&k).is_some(),
            Kind::Pod => self.pods.remove(&k).is_some(),
            Kind::Service => self.services.remove(&k).is_some(),
            Kind::EndpointSlice => match self.endpoint_slices.remove(&k) {
                Some(old) => {
                    if let Some(group) = slice_service(&old) {
                        let stamp = self.stamp();
                        self.leave_group(&group, &k, stamp);
                    }
                    true
                }
                None => false,
            },
            Kind::NetworkPolicy => self.network_policies.remove(&k).is_some(),
        };
        if removed {
            let stamp = self.stamp();
            self.kind_stamps[kind as usize] = stamp;
            match kind {
                Kind::Node => {
                    self.node_stamps.insert(k, stamp);
                }
                Kind::Service => self.stamp_group(&k, stamp),
                _ => {}
            }
            self.forget_gone_groups();
        }
        removed
    }

    fn stamp(&mut self) -> u64 {
        self.last_stamp = next_stamp();
        self.last_stamp
    }

    /// Records a change to Service group `group`.
    fn stamp_group(&mut self, group: &Key, stamp: u64) {
        if let Some(old) = self.group_stamps.insert(group.clone(), stamp) {
            self.group_log.remove(&old);
        }
        self.group_log.insert(stamp, group.clone());
    }

    /// Forgets groups without a Service or a slice once they are more than the live ones
    /// (and a thousand): a store that Services come to and go from keeps a bounded
    /// history. Who looked before the newest forgotten change must then look at every
    /// group ([`Objects::horizon`]).
    fn forget_gone_groups(&mut self) {
        let live = self.services.len() + self.slices_by_service.len();
        if self.group_log.len() <= 2 * live + 1024 {
            return;
        }
        let gone: Vec<(u64, Key)> = self
            .group_log
            .iter()
            .filter(|(_, g)| {
                !self.services.contains_key(*g) && !self.slices_by_service.contains_key(*g)
            })
            .map(|(s, g)| (*s, g.clone()))
            .collect();
        for (stamp, group) in gone {
            self.group_log.remove(&stamp);
            self.group_stamps.remove(&group);
            self.horizon = self.horizon.max(stamp);
        }
    }

    /// Which store this is (a clone is another store).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The newest stamp this store gave (0: none).
    pub fn last_stamp(&self) -> u64 {
        self.last_stamp
    }

    /// Changes up to this stamp may be missing from [`Objects::groups_changed_since`].
    pub fn horizon(&self) -> u64 {
        self.horizon
    }

    /// The Service groups changed after stamp `since` (Service or slice added, changed,
    /// relabelled or deleted), oldest change first. Complete only for `since` ≥
    /// [`Objects::horizon`].
    pub fn groups_changed_since(&self, since: u64) -> impl Iterator<Item = &(String, String)> {
        self.group_log
            .range(since.saturating_add(1)..)
            .map(|(_, g)| g)
    }

    /// The Service with this (namespace, name).
    pub fn service(&self, key: &(String, String)) -> Option<&Service> {
        self.services.get(key)
    }

    /// Takes slice `slice` out of Service group `group`.
    fn leave_group(&mut self, group: &Key, slice: &Key, stamp: u64) {
        if let Some(set) = self.slices_by_service.get_mut(group) {
            set.remove(slice);
            if set.is_empty() {
                self.slices_by_service.remove(group);
            }
        }
        self.stamp_group(group, stamp);
    }

    /// The stamp of the last change to objects of `kind` (0: none yet).
    pub fn kind_stamp(&self, kind: Kind) -> u64 {
        self.kind_stamps[kind as usize]
    }

    /// The stamp of the last change to the Node called `name` (0: none yet).
    pub fn node_stamp(&self, name: &str) -> u64 {
        self.node_stamps
            .get(&key(Kind::Node, "", name))
            .copied()
            .unwrap_or(0)
    }

    /// The stamp of the last change to the Service group (namespace, Service name): the
    /// Service itself, or an EndpointSlice that is or was labelled with its name (0: none
    /// yet).
    pub fn group_stamp(&self, group: &(String, String)) -> u64 {
        self.group_stamps.get(group).copied().unwrap_or(0)
    }

    /// Services with their (namespace, name), by namespace and name.
    pub fn services_by_key(&self) -> impl Iterator<Item = (&(String, String), &Service)> {
        self.services.iter()
    }

    /// The EndpointSlices labelled with Service `group`'s name in its namespace, by name.
    pub fn slices_of(&self, group: &(String, String)) -> Vec<&EndpointSlice> {
        self.slices_by_service
            .get(group)
            .into_iter()
            .flatten()
            .filter_map(|k| self.endpoint_slices.get(k))
            .collect()
    }

    /// The Node called `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(&key(Kind::Node, "", name))
    }

    /// Nodes, by name.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// Namespaces, by name.
    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.namespaces.values()
    }

    /// Pods, by namespace and name.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.values()
    }

    /// Services, by namespace and name.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    /// EndpointSlices, by namespace and name.
    pub fn endpoint_slices(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.endpoint_slices.values()
    }

    /// NetworkPolicies, by namespace and name.
    pub fn network_policies(&self) -> impl Iterator<Item = &NetworkPolicy> {
        self.network_policies.values()
    }

    /// Number of objects of `kind`.
    pub fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Node => self.nodes.len(),
            Kind::Namespace => self.namespaces.len(),
            Kind::Pod => self.pods.len(),
            Kind::Service => self.services.len(),
            Kind::EndpointSlice => self.endpoint_slices.len(),
            Kind::NetworkPolicy => self.network_policies.len(),
        }
    }

    /// Number of objects held.
    pub fn len(&self) -> usize {
        Kind::ALL.into_iter().map(|k| self.count(k)).sum()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Stores one parsed document in `objects` (see [`Objects::apply_document`]).
pub fn apply_value(
    objects: &mut Objects,
    value: &Value,
    origin: &str,
) -> Result<Vec<Applied>, ObjectError> {
    objects.apply_document(value.clone(), origin)
}

/// The namespace and name of an object's metadata, `default` for a namespaced object
/// without a namespace (stored objects always have theirs filled in).
pub fn namespace_and_name(md: &ObjectMeta) -> (&str, &str) {
    (
        md.namespace.as_deref().unwrap_or("default"),
        md.name.as_deref().unwrap_or(""),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Value {
        serde_yaml::from_str(text).expect("test YAML")
    }

    #[test]
    fn dispatches_on_kind_and_defaults_namespace() {
        let mut o = Objects::new();
        let a = o
            .apply_document(
                doc("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 172.30.0.1, ports: [{port: 80}]}"),
                "t",
            )
            .expect("valid");
        assert_eq!(
            a,
            [Applied::Stored {
                kind: Kind::Service,
                namespace: "default".into(),
                name: "web".into()
            }]
        );
        let svc = o.services().next().expect("stored");
        assert_eq!(svc.metadata.namespace.as_deref(), Some("default"));
        assert!(o.delete("Service", "", "web"));
        assert!(o.is_empty());
    }

    #[test]
    fn unknown_kinds_are_ignored() {
        let mut o = Objects::new();
        let a = o
            .apply_document(
                doc("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}"),
                "t",
            )
            .expect("ignored, not an error");
        assert!(matches!(&a[0], Applied::Ignored { kind, .. } if kind == "ConfigMap"));
        assert!(o.is_empty());
    }

    #[test]
    fn wrong_api_version_says_which_to_use() {
        let mut o = Objects::new();
        let e = o
            .apply_document(
                doc("apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4"),
                "t",
            )
            .expect_err("v1beta1 is not served");
        assert!(
            e.to_string()
                .contains("write apiVersion: discovery.k8s.io/v1"),
            "{e}"
        );
        let e = o
            .apply_document(doc("kind: Pod\nmetadata: {name: p}"), "t")
            .expect_err("no apiVersion");
        assert!(matches!(
            e,
            ObjectError::MissingApiVersion { kind: Kind::Pod }
        ));
    }

    #[test]
    fn bad_field_is_reported_by_path() {
        let mut o = Objects::new();
        let e = o
            .apply_document(
                doc("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: eighty}]}"),
                "t",
            )
            .expect_err("bad port");
        assert_eq!(
            e.to_string(),
            "spec.ports[0].port: invalid type: string \"eighty\", expected i32"
        );
    }

    #[test]
    fn list_stores_good_items_and_reports_bad_ones() {
        let mut o = Objects::new();
        let e = o
            .apply_document(
                doc("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n- {apiVersion: v1, kind: Service, metadata: {name: s}, spec: {ports: [{port: x}]}}\n- {apiVersion: v1, kind: Pod}"),
                "t",
            )
            .expect_err("two bad items");
        let errors: Vec<String> = e.flatten().iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 2);
        assert!(
            errors[0].starts_with("items[1].spec.ports[0].port:"),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with("items[2]: Pod without metadata.name"),
            "{errors:?}"
        );
        assert_eq!(o.count(Kind::Namespace), 1);
    }

    #[test]
    fn not_an_object_is_an_error_not_a_panic() {
        let mut o = Objects::new();
        for text in [
            "[1, 2]",
            "42",
            "kind: 7",
            "apiVersion: v1\nkind: Node\nmetadata: 5",
        ] {
            assert!(o.apply_document(doc(text), "t").is_err(), "{text}");
        }
        assert!(o.is_empty());
    }

    #[test]
    fn merge_keys_are_applied() {
        let mut o = Objects::new();
        o.apply_document(
            doc("apiVersion: v1\nkind: Node\nmetadata:\n  <<: {labels: {a: b}}\n  name: n"),
            "t",
        )
        .expect("merge key");
        let n = o.node("n").expect("stored");
        assert_eq!(
            n.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("a"))
                .map(String::as_str),
            Some("b")
        );
    }
}
