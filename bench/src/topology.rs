//! The bench's namespaces: generator → device under test → sink, or generator → sink for
//! the generator's own ceiling.
//!
//! ```text
//! ns …-gen                ns …-dut                               ns …-sink
//!   g0 ──────veth──────── u0 (the node's uplink, 192.168.0.2/24)
//!                         p0 (the pod side: the endpoints) ──veth── s0 (XDP → AF_XDP)
//! ```
//!
//! Every namespace is new (named with the process id and a counter, deleted on drop, also
//! on failure), both ends of every veth are inside them, IPv6 is off so links carry only
//! the bench's frames, and transmit checksum offload and segmentation are off on every
//! veth end, as kxdp requires of pods (the lab does the same). MACs are fixed, so the
//! generator addresses its next hop without ARP.

use std::net::Ipv4Addr;

use anyhow::Context;

use crate::netns::{self, NetnsGuard, VethEnd};

/// The generator's interface MAC.
pub const GEN_MAC: [u8; 6] = crate::ceiling::GEN_MAC;
/// The sink's interface MAC.
pub const SINK_MAC: [u8; 6] = crate::ceiling::SINK_MAC;
/// The device under test's uplink MAC (the generator's next hop).
pub const DUT_UPLINK_MAC: [u8; 6] = [0x02, 0x6b, 0x62, 0x00, 0x02, 0x01];
/// The device under test's pod-side MAC.
pub const DUT_POD_MAC: [u8; 6] = [0x02, 0x6b, 0x62, 0x00, 0x02, 0x02];
/// The generator's address on the uplink network (a router outside the cluster).
pub const GEN_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
/// Prefix length of the uplink network.
pub const UPLINK_PREFIX: u8 = 24;
/// Generator interface.
pub const GEN_IF: &str = "g0";
/// Device under test: uplink.
pub const UPLINK_IF: &str = "u0";
/// Device under test: pod side.
pub const POD_IF: &str = "p0";
/// Sink interface.
pub const SINK_IF: &str = "s0";

/// The namespaces of one run.
#[derive(Debug)]
pub struct Topology {
    /// The generator's.
    pub gen: NetnsGuard,
    /// The device under test's, if there is one.
    pub dut: Option<NetnsGuard>,
    /// The sink's.
    pub sink: NetnsGuard,
}

/// A fresh namespace with IPv6 off (no neighbour discovery or router solicitations).
fn quiet(prefix: &str) -> anyhow::Result<NetnsGuard> {
    crate::ceiling::quiet_namespace(prefix)
}

/// Turns off transmit checksum offload and segmentation on `dev` in `ns` (a pod must send
/// complete packets to kxdp); receive offloads do not apply to veth without XDP.
pub fn offloads_off(ns: &NetnsGuard, dev: &str) -> anyhow::Result<()> {
    netns::exec(
        ns.name(),
        "ethtool",
        &["-K", dev, "tx", "off", "tso", "off", "gso", "off"],
        None,
    )
    .with_context(|| format!("ethtool -K {dev} in {}", ns.name()))?;
    Ok(())
}

impl Topology {
    /// Generator straight into the sink: the generator's ceiling.
    pub fn direct(tag: &str) -> anyhow::Result<Topology> {
        let gen = quiet(&format!("kxdp-b{tag}-gen"))?;
        let sink = quiet(&format!("kxdp-b{tag}-sink"))?;
        netns::veth(
            VethEnd {
                ns: &gen,
                name: GEN_IF,
                mac: GEN_MAC,
            },
            VethEnd {
                ns: &sink,
                name: SINK_IF,
                mac: SINK_MAC,
            },
        )?;
        offloads_off(&gen, GEN_IF)?;
        offloads_off(&sink, SINK_IF)?;
        Ok(Topology {
            gen,
            dut: None,
            sink,
        })
    }

    /// Generator → device under test → sink. The device under test's namespace gets the
    /// node's uplink address (`node_ip`) on its uplink; everything else (forwarding,
    /// rulesets, a dataplane) is the device's own set-up.
    pub fn through_dut(tag: &str, node_ip: Ipv4Addr) -> anyhow::Result<Topology> {
        let gen = quiet(&format!("kxdp-b{tag}-gen"))?;
        let dut = quiet(&format!("kxdp-b{tag}-dut"))?;
        let sink = quiet(&format!("kxdp-b{tag}-sink"))?;
        netns::veth(
            VethEnd {
                ns: &gen,
                name: GEN_IF,
                mac: GEN_MAC,
            },
            VethEnd {
                ns: &dut,
                name: UPLINK_IF,
                mac: DUT_UPLINK_MAC,
            },
        )?;
        netns::veth(
            VethEnd {
                ns: &dut,
                name: POD_IF,
                mac: DUT_POD_MAC,
            },
            VethEnd {
                ns: &sink,
                name: SINK_IF,
                mac: SINK_MAC,
            },
        )?;
        for (ns, dev) in [
            (&gen, GEN_IF),
            (&dut, UPLINK_IF),
            (&dut, POD_IF),
            (&sink, SINK_IF),
        ] {
            offloads_off(ns, dev)?;
        }
        gen.ip(&[
            "addr",
            "add",
            &format!("{GEN_IP}/{UPLINK_PREFIX}"),
            "dev",
            GEN_IF,
        ])?;
        dut.ip(&[
            "addr",
            "add",
            &format!("{node_ip}/{UPLINK_PREFIX}"),
            "dev",
            UPLINK_IF,
        ])?;
        Ok(Topology {
            gen,
            dut: Some(dut),
            sink,
        })
    }

    /// A device under test alone, in `dut` (its interfaces brought in from elsewhere: a
    /// VM's NICs). The generator and sink namespaces are empty placeholders: the generator
    /// and the sink run on other machines.
    pub fn dut_only(dut: NetnsGuard) -> anyhow::Result<Topology> {
        Ok(Topology {
            gen: quiet("kxdp-bvm-nogen")?,
            dut: Some(dut),
            sink: quiet("kxdp-bvm-nosink")?,
        })
    }

    /// The MAC the generator addresses: the device under test's uplink, or the sink.
    pub fn next_hop_mac(&self) -> [u8; 6] {
        if self.dut.is_some() {
            DUT_UPLINK_MAC
        } else {
            SINK_MAC
        }
    }

    /// The device under test's namespace; panics for a direct topology (a bug).
    pub fn dut_ns(&self) -> &NetnsGuard {
        self.dut
            .as_ref()
            .expect("a topology with a device under test")
    }
}
