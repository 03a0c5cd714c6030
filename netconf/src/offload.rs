//! Turns off an interface's checksum and segmentation offloads, as `ethtool -K IF tx off
//! rx off tso off gso off gro off` does, through ethtool's generic-netlink family
//! (`ETHTOOL_MSG_FEATURES_SET`, Linux 5.6).
//!
//! kxdp rewrites headers with incremental checksums and never segments: a partial
//! checksum or a 64 KiB TSO frame from a pod (or from the node's kernel, on the host pair)
//! would leave the node wrong.

use std::io;

use crate::genl::{self, Ethtool, NLA_F_NESTED, NLM_F_ACK};

/// The features turned off, by the kernel's names (`ethtool -k` shows them).
pub const FEATURES_OFF: &[&str] = &[
    "tx-checksum-ipv4",
    "tx-checksum-ip-generic",
    "tx-checksum-ipv6",
    "tx-checksum-sctp",
    "tx-tcp-segmentation",
    "tx-tcp-ecn-segmentation",
    "tx-tcp-mangleid-segmentation",
    "tx-tcp6-segmentation",
    "tx-udp-segmentation",
    "tx-generic-segmentation",
    "rx-checksum",
    "rx-gro",
];

/// Features only newer kernels name (AccECN segmentation, Linux 6.18): asked for first, and
/// left out when the kernel refuses a name it does not know.
pub const NEWER_FEATURES_OFF: &[&str] = &["tx-tcp-accecn-segmentation"];

const ETHTOOL_MSG_FEATURES_SET: u8 = 12;
const ETHTOOL_A_FEATURES_HEADER: u16 = 1;
const ETHTOOL_A_FEATURES_WANTED: u16 = 3;
const ETHTOOL_A_BITSET_BITS: u16 = 3;
const ETHTOOL_A_BITSET_BITS_BIT: u16 = 1;
const ETHTOOL_A_BITSET_BIT_NAME: u16 = 2;

/// Turns [`FEATURES_OFF`] (and [`NEWER_FEATURES_OFF`] where the kernel has them) off on
/// link `index` of the calling thread's namespace.
pub fn disable(index: u32) -> io::Result<()> {
    let mut ethtool = Ethtool::open()?;
    let all: Vec<&str> = FEATURES_OFF
        .iter()
        .chain(NEWER_FEATURES_OFF)
        .copied()
        .collect();
    match set_off(&mut ethtool, index, &all) {
        // An unknown bit name is refused with EOPNOTSUPP ("unrecognized bit name").
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            set_off(&mut ethtool, index, FEATURES_OFF)
        }
        other => other,
    }
}

fn set_off(ethtool: &mut Ethtool, index: u32, features: &[&str]) -> io::Result<()> {
    let header = genl::device_header(index, genl::ETHTOOL_FLAG_OMIT_REPLY);
    let mut bits = Vec::new();
    for name in features {
        // A bit listed without ETHTOOL_A_BITSET_BIT_VALUE is set to 0; bits not listed
        // keep their state (no ETHTOOL_A_BITSET_NOMASK).
        let mut bit = Vec::new();
        genl::put_attr(&mut bit, ETHTOOL_A_BITSET_BIT_NAME, &genl::c_string(name));
        genl::put_attr(&mut bits, ETHTOOL_A_BITSET_BITS_BIT | NLA_F_NESTED, &bit);
    }
    let mut wanted = Vec::new();
    genl::put_attr(&mut wanted, ETHTOOL_A_BITSET_BITS | NLA_F_NESTED, &bits);
    let mut attrs = Vec::new();
    genl::put_attr(
        &mut attrs,
        ETHTOOL_A_FEATURES_HEADER | NLA_F_NESTED,
        &header,
    );
    genl::put_attr(
        &mut attrs,
        ETHTOOL_A_FEATURES_WANTED | NLA_F_NESTED,
        &wanted,
    );
    ethtool
        .request(ETHTOOL_MSG_FEATURES_SET, NLM_F_ACK, &attrs)
        .map(drop)
}
