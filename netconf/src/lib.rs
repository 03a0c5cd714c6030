//! netconf: a node's network configuration through netlink — veth pairs, addresses and
//! routes (route netlink), offloads and channel counts (ethtool's generic-netlink family) —
//! on plain blocking sockets in the calling thread's network namespace.
//!
//! What it deliberately does not do: decide anything. It runs no async runtime, keeps no
//! state, and knows nothing of pods, Services or tables; `kxdp-cni` and `kxdp-dataplane`
//! say what to configure.

#![forbid(unsafe_code)]

pub mod channels;
mod genl;
pub mod netlink;
pub mod offload;
