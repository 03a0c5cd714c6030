//! Benchmarks of kxdp against the kernel paths it replaces (issue 7): the rulesets
//! kube-proxy's iptables and nftables modes would write for the same Services
//! ([`baseline`]), Service sets of any size to feed both ([`scenario`]), an AF_XDP traffic
//! generator and a counting, timestamp-reading sink ([`gen`], [`sink`], over frames built
//! by [`frame`]), and the generator's own ceiling measured generator → veth → sink
//! ([`ceiling`]).
//!
//! Everything that sends packets runs in network namespaces it creates and deletes
//! ([`netns`]); nothing here touches the root namespace's interfaces, addresses, routes or
//! firewall. The pure parts (rulesets, frames, scenarios) do no I/O and are tested in
//! memory. It does not yet run the devices under test or write reports: those build on
//! these parts.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod baseline;
pub mod ceiling;
pub mod frame;
pub mod gen;
pub mod netns;
pub mod scenario;
pub mod sink;
