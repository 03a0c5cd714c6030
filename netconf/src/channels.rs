//! An interface's channels (queues), as `ethtool -l` shows and `ethtool -L` sets them,
//! through ethtool's generic-netlink family (`ETHTOOL_MSG_CHANNELS_GET`/`_SET`, Linux 5.6).
//!
//! A driver counts its receive queues either as combined channels (one RX and one TX queue
//! with one interrupt: most NICs) or as RX-only channels (veth, some older drivers); the
//! receive queues are the sum of the two.

use std::io;

use crate::genl::{self, Ethtool, NLA_F_NESTED, NLM_F_ACK};

const ETHTOOL_MSG_CHANNELS_GET: u8 = 17;
const ETHTOOL_MSG_CHANNELS_SET: u8 = 18;
const ETHTOOL_A_CHANNELS_HEADER: u16 = 1;
const ETHTOOL_A_CHANNELS_RX_MAX: u16 = 2;
const ETHTOOL_A_CHANNELS_TX_MAX: u16 = 3;
const ETHTOOL_A_CHANNELS_COMBINED_MAX: u16 = 5;
const ETHTOOL_A_CHANNELS_RX_COUNT: u16 = 6;
const ETHTOOL_A_CHANNELS_TX_COUNT: u16 = 7;
const ETHTOOL_A_CHANNELS_COMBINED_COUNT: u16 = 9;

/// An interface's channel counts and their maximums (0 where the driver has none of a kind).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Channels {
    /// RX-only channels.
    pub rx: u32,
    /// TX-only channels.
    pub tx: u32,
    /// Combined channels.
    pub combined: u32,
    /// The most RX-only channels the driver allows.
    pub rx_max: u32,
    /// The most TX-only channels the driver allows.
    pub tx_max: u32,
    /// The most combined channels the driver allows.
    pub combined_max: u32,
}

impl Channels {
    /// Receive queues: RX-only plus combined channels.
    pub fn rx_queues(&self) -> u32 {
        self.rx + self.combined
    }

    /// What to ask of the driver so that it has exactly `queues` receive queues: the
    /// combined count where it counts combined channels, else the RX count. `None` when
    /// it has both kinds (which to cut is the operator's call) or cannot reach `queues`.
    pub fn with_rx_queues(&self, queues: u32) -> Option<ChannelsChange> {
        match (self.combined, self.rx) {
            (c, 0) if c > 0 && queues <= self.combined_max => {
                Some(ChannelsChange::Combined(queues))
            }
            (0, r) if r > 0 && queues <= self.rx_max => Some(ChannelsChange::Rx(queues)),
            _ => None,
        }
    }
}

/// One change of channel counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelsChange {
    /// Set the combined channels (`ethtool -L IF combined N`).
    Combined(u32),
    /// Set the RX-only channels (`ethtool -L IF rx N`).
    Rx(u32),
}

/// The channels of link `index` in the calling thread's namespace.
pub fn get(index: u32) -> io::Result<Channels> {
    let mut ethtool = Ethtool::open()?;
    let mut attrs = Vec::new();
    genl::put_attr(
        &mut attrs,
        ETHTOOL_A_CHANNELS_HEADER | NLA_F_NESTED,
        &genl::device_header(index, 0),
    );
    let answers = ethtool.request(ETHTOOL_MSG_CHANNELS_GET, 0, &attrs)?;
    let reply = answers
        .first()
        .ok_or_else(|| io::Error::other("no answer to ETHTOOL_MSG_CHANNELS_GET"))?;
    Ok(parse(reply))
}

/// Applies `change` to link `index`.
pub fn set(index: u32, change: ChannelsChange) -> io::Result<()> {
    let mut ethtool = Ethtool::open()?;
    let mut attrs = Vec::new();
    genl::put_attr(
        &mut attrs,
        ETHTOOL_A_CHANNELS_HEADER | NLA_F_NESTED,
        &genl::device_header(index, genl::ETHTOOL_FLAG_OMIT_REPLY),
    );
    let (kind, count) = match change {
        ChannelsChange::Combined(n) => (ETHTOOL_A_CHANNELS_COMBINED_COUNT, n),
        ChannelsChange::Rx(n) => (ETHTOOL_A_CHANNELS_RX_COUNT, n),
    };
    genl::put_attr(&mut attrs, kind, &count.to_ne_bytes());
    ethtool
        .request(ETHTOOL_MSG_CHANNELS_SET, NLM_F_ACK, &attrs)
        .map(drop)
}

/// A `CHANNELS_GET` reply's attributes; a count the kernel left out (the driver has none
/// of that kind) is 0.
fn parse(attrs: &[u8]) -> Channels {
    let mut c = Channels::default();
    for (kind, value) in genl::attributes(attrs) {
        let Some(v) = value
            .get(..4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        else {
            continue;
        };
        match kind {
            ETHTOOL_A_CHANNELS_RX_MAX => c.rx_max = v,
            ETHTOOL_A_CHANNELS_TX_MAX => c.tx_max = v,
            ETHTOOL_A_CHANNELS_COMBINED_MAX => c.combined_max = v,
            ETHTOOL_A_CHANNELS_RX_COUNT => c.rx = v,
            ETHTOOL_A_CHANNELS_TX_COUNT => c.tx = v,
            ETHTOOL_A_CHANNELS_COMBINED_COUNT => c.combined = v,
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_read_and_short_values_skipped() {
        let mut attrs = Vec::new();
        genl::put_attr(
            &mut attrs,
            ETHTOOL_A_CHANNELS_HEADER | NLA_F_NESTED,
            &genl::device_header(3, 0),
        );
        genl::put_attr(
            &mut attrs,
            ETHTOOL_A_CHANNELS_COMBINED_MAX,
            &8u32.to_ne_bytes(),
        );
        genl::put_attr(
            &mut attrs,
            ETHTOOL_A_CHANNELS_COMBINED_COUNT,
            &6u32.to_ne_bytes(),
        );
        genl::put_attr(&mut attrs, ETHTOOL_A_CHANNELS_RX_COUNT, &[1, 2]);
        let c = parse(&attrs);
        assert_eq!(
            c,
            Channels {
                combined: 6,
                combined_max: 8,
                ..Channels::default()
            }
        );
        assert_eq!(c.rx_queues(), 6);
    }

    #[test]
    fn the_kind_of_channel_the_driver_counts_is_the_one_changed() {
        let nic = Channels {
            combined: 8,
            combined_max: 8,
            tx_max: 0,
            ..Channels::default()
        };
        assert_eq!(nic.with_rx_queues(2), Some(ChannelsChange::Combined(2)));
        assert_eq!(nic.with_rx_queues(9), None);
        let veth = Channels {
            rx: 4,
            tx: 4,
            rx_max: 4,
            tx_max: 4,
            ..Channels::default()
        };
        assert_eq!(veth.with_rx_queues(2), Some(ChannelsChange::Rx(2)));
        let mixed = Channels {
            rx: 2,
            combined: 4,
            rx_max: 4,
            combined_max: 4,
            ..Channels::default()
        };
        assert_eq!(mixed.with_rx_queues(2), None);
        assert_eq!(Channels::default().with_rx_queues(1), None);
    }
}
