//! kxdp's control side: Kubernetes objects in, dataplane tables out.
//!
//! Objects come from a directory of manifests ([`manifests`]) into a store that applies the
//! API server's defaults ([`objects`], [`defaults`]); one computation
//! ([`tables::TableComputer`], from scratch [`tables::compute_with_warnings`]) applies
//! kube-proxy's semantics to them and yields a [`nat::spec::TableSpec`], which the
//! [`programmer`] publishes and [`stream`] sends to `kxdp-dataplane` over its Unix socket
//! ([`ctlclient`]). It deliberately handles no
//! packets and keeps no dataplane state: the dataplane forwards with its last tables
//! whether or not control is running. Objects can also come from a live API server
//! ([`kube_source`], kube-rs watchers that keep the same store). It does not validate
//! objects the way the API server would: what cannot be used is skipped with a warning.
//! Operators see it as they see kube-proxy: `/healthz`, `/livez` and the health-check node
//! ports of `externalTrafficPolicy: Local` Services ([`health`]), and Prometheus metrics
//! ([`metrics`]) with the network programming latency. On a cluster it announces the
//! node's VXLAN endpoint on its own Node as kxdp's and flannel's annotations
//! ([`node_announce`]), and writes the node's CNI network config for `kxdp-cni` from the
//! Node's podCIDRs ([`cni_conf`]).

#![forbid(unsafe_code)]

pub mod cni_conf;
pub mod defaults;
pub mod follow;
pub mod health;
pub mod kube_source;
pub mod labels;
pub mod manifests;
pub mod metrics;
pub mod node_announce;
pub mod objects;
pub mod policy;
pub mod programmer;
pub mod stream;
pub mod tables;
pub mod uplink;
pub mod warning;

pub use k8s_openapi;
pub use manifests::{
    fingerprint, load_dir, load_text, Fingerprint, Kept, Loaded, ManifestDir, ManifestError,
};
pub use objects::{apply_value, Applied, Kind, Object, ObjectError, Objects};
pub use programmer::Programmer;
pub use stream::{Stream, StreamError};
pub use tables::{compute_with_warnings, Computed, Refusals, TableComputer, TableError};
pub use warning::Warning;
