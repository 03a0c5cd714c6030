//! Benchmarks of kxdp against the kernel paths it replaces (issue 7): the rulesets
//! kube-proxy's iptables and nftables modes would write for the same Services
//! ([`baseline`]), Service sets of any size to feed both ([`scenario`]), an AF_XDP traffic
//! generator and a counting, timestamp-reading sink ([`gen`], [`sink`], over frames built
//! by [`frame`], driven together on one core by [`load`]), the generator's own ceiling
//! ([`ceiling`]), the devices under test on a generator → DUT → sink lab ([`topology`],
//! [`dut`], [`forwarder`]), the scenarios run in alternation ([`suite`], [`measure`],
//! [`install`]) and their report ([`report`], [`plot`]); the same roles on three machines
//! for the VM bench ([`remote`]).
//!
//! Everything that sends packets runs in network namespaces it creates and deletes
//! ([`netns`]); nothing here touches the root namespace's interfaces, addresses, routes or
//! firewall. The pure parts (rulesets, frames, scenarios, reports) do no I/O and are tested
//! in memory. Nothing here asserts a speed: the tests check that the tools measure what
//! they say, the harness reports numbers.

#![forbid(unsafe_code)]

pub mod baseline;
pub mod ceiling;
pub mod dut;
pub mod forwarder;
pub mod frame;
pub mod gen;
pub mod install;
pub mod load;
pub mod measure;
pub mod netns;
pub mod plot;
pub mod record;
pub mod remote;
pub mod report;
pub mod scenario;
pub mod sink;
pub mod suite;
pub mod sysinfo;
pub mod topology;

/// Pins the calling thread to `core` (if the machine has it); warns if it cannot.
pub fn pin(core: usize) {
    if let Some(id) = core_affinity::get_core_ids().and_then(|ids| ids.get(core).copied()) {
        if !core_affinity::set_for_current(id) {
            log::warn!("could not pin to core {core}");
        }
    }
}
