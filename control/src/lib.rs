//! kxdp's control side: Kubernetes objects in, dataplane tables out.
//!
//! Objects come from a directory of manifests ([`manifests`]) or, later, from the API server;
//! both feed one pure function ([`tables::compute`]) that applies kube-proxy's semantics and
//! yields a [`nat::spec::TableSpec`], which [`stream`] sends to `kxdp-dataplane`. Nothing
//! here handles packets.

#![forbid(unsafe_code)]

pub mod manifests;
pub mod objects;
pub mod stream;
pub mod tables;

pub use k8s_openapi;
pub use manifests::{load_dir, ManifestError};
pub use objects::{apply_value, Objects};
pub use tables::{compute, compute_with_warnings, TableError};

/// [`tables::compute`] under the name the case runner uses.
pub fn compute_tables(
    objects: &Objects,
    node_name: &str,
    cluster: &nat::spec::ClusterSpec,
) -> Result<nat::spec::TableSpec, TableError> {
    compute(objects, node_name, cluster)
}
