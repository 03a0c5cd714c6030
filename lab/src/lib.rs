//! The kxdp lab: a node, its pods and an outside host as network namespaces on veth pairs,
//! built from a small description (`lab/lab.yaml`), so the dataplane can be run and tested
//! with real kernels on one machine; and (binary `kxdp-lab`) the tools that run in it: the
//! pods' echo server, test clients, load and flood generators, and the demo.
//!
//! It is lab and test equipment, not part of a node's dataplane: the operator's `kxdp`
//! (inspection and operation) and `dataplane` never depend on it. It drives the OS through
//! `ip` and `ethtool` and touches nothing outside the namespaces it creates.

#![forbid(unsafe_code)]

mod error;
mod namespaces;
mod spec;

pub use error::LabError;
pub use namespaces::{run, Lab, HOST_PAIR_ADDRESS};
pub use spec::{LabNode, LabOutside, LabPod, LabSpec};
