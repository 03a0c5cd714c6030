//! What the store holds and what it says back: the [`Kind`]s control uses, one typed
//! [`Object`] of them, what became of a document ([`Applied`]), and what can be wrong with
//! one ([`ObjectError`]).

use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The kinds control stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1` Node (cluster-scoped).
    Node,
    /// `v1` Namespace (cluster-scoped).
    Namespace,
    /// `v1` Pod.
    Pod,
    /// `v1` Service.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice,
    /// `networking.k8s.io/v1` NetworkPolicy.
    NetworkPolicy,
}

impl Kind {
    /// Every kind, in a fixed order.
    pub const ALL: [Kind; 6] = [
        Kind::Node,
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::NetworkPolicy,
    ];

    /// The kind called `name` (as in a manifest's `kind:`), if control stores it.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The name written in `kind:`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }

    /// The `apiVersion` this kind is served at.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Node | Kind::Namespace | Kind::Pod | Kind::Service => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::NetworkPolicy => "networking.k8s.io/v1",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn is_namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::Namespace)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One typed object of a stored kind.
// Moved once, from the parser into the store: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Object {
    /// A Node.
    Node(Node),
    /// A Namespace.
    Namespace(Namespace),
    /// A Pod.
    Pod(Pod),
    /// A Service.
    Service(Service),
    /// An EndpointSlice.
    EndpointSlice(EndpointSlice),
    /// A NetworkPolicy.
    NetworkPolicy(NetworkPolicy),
}

impl Object {
    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Node(_) => Kind::Node,
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
        }
    }

    pub(super) fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Node(o) => &mut o.metadata,
            Object::Namespace(o) => &mut o.metadata,
            Object::Pod(o) => &mut o.metadata,
            Object::Service(o) => &mut o.metadata,
            Object::EndpointSlice(o) => &mut o.metadata,
            Object::NetworkPolicy(o) => &mut o.metadata,
        }
    }
}

/// Why a document could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The document is a scalar or a sequence, not an object.
    #[error("not a Kubernetes object but a {found}: a manifest document is a mapping with apiVersion, kind and metadata")]
    NotAnObject {
        /// What the document is.
        found: &'static str,
    },
    /// The document has no `kind`.
    #[error("no kind: every object needs apiVersion and kind (Service, EndpointSlice, ...)")]
    MissingKind,
    /// A stored kind without `apiVersion`.
    #[error("{kind} without apiVersion: write apiVersion: {}", .kind.api_version())]
    MissingApiVersion {
        /// The kind.
        kind: Kind,
    },
    /// A stored kind at an `apiVersion` the API server does not serve it at.
    #[error("{kind} at apiVersion {got} is not served: write apiVersion: {}", .kind.api_version())]
    WrongApiVersion {
        /// The kind.
        kind: Kind,
        /// The `apiVersion` written.
        got: String,
    },
    /// A field has the wrong shape; `path` says which (`spec.ports[0].port`).
    #[error("{path}: {message}")]
    Field {
        /// The kind being parsed.
        kind: Kind,
        /// Where in the object (`spec.ports[0].port`).
        path: String,
        /// What was wrong, as the parser says it.
        message: String,
    },
    /// The object has no `metadata.name`.
    #[error("{kind} without metadata.name: every object needs a name")]
    MissingName {
        /// The kind.
        kind: Kind,
    },
    /// A YAML merge key (`<<:`) that does not merge a mapping.
    #[error("YAML merge key: {0}")]
    Merge(String),
    /// A `List` whose `items` is not a sequence.
    #[error("items: expected a sequence of objects, found a {found}")]
    ListItems {
        /// What `items` is.
        found: &'static str,
    },
    /// An item of a `List` could not be stored.
    #[error("{}", item_message(*.index, .error))]
    Item {
        /// Index in `items`, from 0.
        index: usize,
        /// What was wrong with it.
        error: Box<ObjectError>,
    },
    /// Some items of a `List` could not be stored (the others were).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    List(Vec<ObjectError>),
}

fn item_message(index: usize, error: &ObjectError) -> String {
    match error {
        ObjectError::Field { path, message, .. } => format!("items[{index}].{path}: {message}"),
        other => format!("items[{index}]: {other}"),
    }
}

impl ObjectError {
    /// The errors this one stands for: each item's for a `List`, else itself.
    pub fn flatten(self) -> Vec<ObjectError> {
        match self {
            ObjectError::List(errors) => errors,
            other => vec![other],
        }
    }
}

/// What [`Objects::apply_document`](crate::objects::Objects::apply_document) did with a document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Stored (created or replaced).
    Stored {
        /// The kind.
        kind: Kind,
        /// The namespace; empty for cluster-scoped kinds.
        namespace: String,
        /// The name.
        name: String,
    },
    /// A kind control does not use; ignored.
    Ignored {
        /// The `apiVersion` written.
        api_version: String,
        /// The `kind` written.
        kind: String,
    },
}
