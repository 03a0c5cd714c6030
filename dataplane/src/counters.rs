//! Per-worker counters: plain `u64`s in a cache-aligned struct that only its worker writes,
//! published to atomics once per burst so readers never slow the hot path.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! drop_reasons {
    ($($(#[doc = $doc:literal])* $name:ident => $label:literal,)*) => {
        /// Why the pipeline dropped a frame; each reason has its own counter.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(usize)]
        pub enum DropReason {
            $($(#[doc = $doc])* $name,)*
        }

        impl DropReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];
            /// Number of reasons.
            pub const COUNT: usize = DropReason::ALL.len();

            /// The reason's name in metrics and `kxdp stats`.
            pub fn label(self) -> &'static str {
                match self {
                    $(DropReason::$name => $label,)*
                }
            }
        }
    };
}

drop_reasons! {
    /// Not Ethernet II with IPv4, IPv6 or ARP.
    UnknownEthertype => "unknown_ethertype",
    /// Shorter than the headers it announces.
    Truncated => "truncated",
    /// Invalid IP header (version, length).
    BadIpHeader => "bad_ip_header",
    /// IPv4 header checksum does not verify.
    BadIpChecksum => "bad_ip_checksum",
    /// IPv6 extension header that is not walked.
    UnsupportedExtension => "unsupported_extension",
    /// An ARP or NDP message consumed without an answer: a reply we learned from, or a
    /// request for an address we do not answer for.
    NeighborConsumed => "neighbor_consumed",
    /// Addressed to the node or its gateway address (not served by the dataplane yet).
    ToHost => "to_host",
    /// A non-first fragment (no ports to translate with).
    Fragment => "fragment",
    /// TTL or hop limit ran out.
    TtlExceeded => "ttl_exceeded",
    /// A Service-range address that no Service holds (kube-proxy nftables drops these).
    NoService => "no_service",
    /// `Local` traffic policy and no local endpoint.
    NoLocalEndpoint => "no_local_endpoint",
    /// A new connection to a load-balancer IP from outside its `loadBalancerSourceRanges`.
    SourceRange => "source_range",
    /// The conntrack table is full: new flow refused.
    ConntrackFull => "conntrack_full",
    /// No free source port for masquerade.
    SnatExhausted => "snat_exhausted",
    /// A new connection's reply tuple is already another live connection's (a client
    /// reusing a port towards a backend it also reaches directly).
    TupleTaken => "tuple_taken",
    /// A new connection NetworkPolicy does not allow (counted per pod and policy too).
    PolicyDenied => "policy_denied",
    /// No route to the destination.
    NoRoute => "no_route",
    /// The next hop did not answer ARP / neighbour solicitation within the hold time, or
    /// the worker's hold queue was full.
    NeighborUnresolved => "neighbor_unresolved",
    /// The frame pool was empty when a reply had to be built.
    NoFrame => "no_frame",
    /// A protocol the dataplane does not translate or route.
    UnsupportedProtocol => "unsupported_protocol",
    /// Tables not received from control yet.
    NoTables => "no_tables",
    /// VXLAN to this node that does not decapsulate (wrong VNI, truncated, bad header).
    BadOverlay => "bad_overlay",
    /// Too big for the overlay and fragmenting was not allowed or not possible.
    TooBig => "too_big",
    /// Not enough headroom before the frame to prepend the overlay headers.
    NoHeadroom => "no_headroom",
}

/// One worker's counters. Only that worker writes them.
#[derive(Clone, Debug)]
#[repr(align(64))]
pub struct Counters {
    /// Frames received.
    pub rx: u64,
    /// Frames transmitted (forwarded or built).
    pub tx: u64,
    /// Bytes of the frames received (Ethernet frames without FCS).
    pub rx_bytes: u64,
    /// Bytes of the frames transmitted.
    pub tx_bytes: u64,
    /// ARP requests and IPv6 neighbour solicitations answered.
    pub arp_replies: u64,
    /// ARP requests and neighbour solicitations sent to resolve a neighbour.
    pub arp_requests: u64,
    /// New Service connections translated.
    pub nat_new: u64,
    /// Packets of tracked connections translated.
    pub nat_hits: u64,
    /// Connections rejected for lack of endpoints (ICMP / RST sent).
    pub rejects: u64,
    /// Packets routed without translation.
    pub routed: u64,
    /// Packets sent into the overlay (VXLAN encapsulated).
    pub encapsulated: u64,
    /// Packets taken out of the overlay.
    pub decapsulated: u64,
    /// ICMP fragmentation-needed / packet-too-big sent.
    pub too_big: u64,
    /// ICMP time exceeded sent (a TTL ran out here).
    pub time_exceeded: u64,
    /// Echo requests to the pods' gateway answered.
    pub echo_replies: u64,
    /// New pod connections masqueraded out of the cluster (ipMasq).
    pub masqueraded_out: u64,
    /// Packets for the node's own addresses handed to its kernel (host port).
    pub to_host: u64,
    /// New untranslated connections of local pods tracked (with their policy verdict).
    pub tracked_new: u64,
    /// New connections of local pods, isolated by no policy, forwarded untracked because
    /// the connection table refused them (full, or their reply tuple taken).
    pub untracked: u64,
    /// Connections evicted to make room for a new one, as the kernel's `early_drop`: not
    /// assured (handshake unfinished, datagrams one way) or expired unswept, when the table
    /// or a tuple's index windows were full or every masquerade port tried was taken.
    pub conntrack_early_drop: u64,
    /// Drops, indexed by [`DropReason`].
    pub drops: [u64; DropReason::COUNT],
    /// The device's own counters (TX ring full, pool empty, the kernel's XDP statistics),
    /// refreshed at housekeeping.
    pub device: pktio::DeviceStats,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            rx: 0,
            tx: 0,
            rx_bytes: 0,
            tx_bytes: 0,
            arp_replies: 0,
            arp_requests: 0,
            nat_new: 0,
            nat_hits: 0,
            rejects: 0,
            routed: 0,
            encapsulated: 0,
            decapsulated: 0,
            too_big: 0,
            time_exceeded: 0,
            echo_replies: 0,
            masqueraded_out: 0,
            to_host: 0,
            tracked_new: 0,
            untracked: 0,
            conntrack_early_drop: 0,
            drops: [0; DropReason::COUNT],
            device: pktio::DeviceStats::default(),
        }
    }
}

impl Counters {
    /// Counts a drop.
    #[inline]
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }

    /// Total drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Named values, for the stats message and printing.
    pub fn named(&self) -> Vec<(String, u64)> {
        let mut out = vec![
            ("rx".to_string(), self.rx),
            ("tx".to_string(), self.tx),
            ("rx_bytes".to_string(), self.rx_bytes),
            ("tx_bytes".to_string(), self.tx_bytes),
            ("arp_replies".to_string(), self.arp_replies),
            ("arp_requests".to_string(), self.arp_requests),
            ("nat_new".to_string(), self.nat_new),
            ("nat_hits".to_string(), self.nat_hits),
            ("rejects".to_string(), self.rejects),
            ("routed".to_string(), self.routed),
            ("encapsulated".to_string(), self.encapsulated),
            ("decapsulated".to_string(), self.decapsulated),
            ("too_big".to_string(), self.too_big),
            ("time_exceeded".to_string(), self.time_exceeded),
            ("echo_replies".to_string(), self.echo_replies),
            ("masqueraded_out".to_string(), self.masqueraded_out),
            ("to_host".to_string(), self.to_host),
            ("tracked_new".to_string(), self.tracked_new),
            ("untracked".to_string(), self.untracked),
            (
                "conntrack_early_drop".to_string(),
                self.conntrack_early_drop,
            ),
        ];
        for r in DropReason::ALL {
            out.push((format!("drop_{}", r.label()), self.drops[*r as usize]));
        }
        let d = &self.device;
        out.extend([
            ("dev_tx_ring_full".to_string(), d.tx_ring_full),
            ("dev_alloc_failed".to_string(), d.alloc_failed),
            ("dev_wakeups".to_string(), d.wakeups),
            ("kernel_rx_dropped".to_string(), d.kernel_rx_dropped),
            ("kernel_rx_ring_full".to_string(), d.kernel_rx_ring_full),
            ("kernel_rx_invalid".to_string(), d.kernel_rx_invalid),
            ("kernel_tx_invalid".to_string(), d.kernel_tx_invalid),
            ("kernel_fill_empty".to_string(), d.kernel_fill_empty),
            ("dev_frames_lost".to_string(), d.frames_lost),
        ]);
        out
    }
}

const FIXED: usize = 20;
const DEVICE: usize = 9;

/// Where a worker publishes its counters for readers on other threads.
pub struct Published {
    values: [AtomicU64; FIXED + DropReason::COUNT + DEVICE],
}

impl Default for Published {
    fn default() -> Self {
        Published {
            values: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Published {
    /// Copies `c` out (Relaxed: each value is independent and only ever grows).
    pub fn publish(&self, c: &Counters) {
        let fixed = [
            c.rx,
            c.tx,
            c.arp_replies,
            c.arp_requests,
            c.nat_new,
            c.nat_hits,
            c.rejects,
            c.routed,
            c.encapsulated,
            c.decapsulated,
            c.too_big,
            c.tracked_new,
            c.untracked,
            c.time_exceeded,
            c.echo_replies,
            c.masqueraded_out,
            c.to_host,
            c.rx_bytes,
            c.tx_bytes,
            c.conntrack_early_drop,
        ];
        let d = &c.device;
        let device = [
            d.tx_ring_full,
            d.alloc_failed,
            d.wakeups,
            d.kernel_rx_dropped,
            d.kernel_rx_ring_full,
            d.kernel_rx_invalid,
            d.kernel_tx_invalid,
            d.kernel_fill_empty,
            d.frames_lost,
        ];
        let all = fixed.iter().chain(c.drops.iter()).chain(device.iter());
        for (slot, v) in self.values.iter().zip(all) {
            slot.store(*v, Ordering::Relaxed);
        }
    }

    /// Reads the last published values.
    pub fn read(&self) -> Counters {
        let v: Vec<u64> = self
            .values
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        let mut c = Counters {
            rx: v[0],
            tx: v[1],
            arp_replies: v[2],
            arp_requests: v[3],
            nat_new: v[4],
            nat_hits: v[5],
            rejects: v[6],
            routed: v[7],
            encapsulated: v[8],
            decapsulated: v[9],
            too_big: v[10],
            tracked_new: v[11],
            untracked: v[12],
            time_exceeded: v[13],
            echo_replies: v[14],
            masqueraded_out: v[15],
            to_host: v[16],
            rx_bytes: v[17],
            tx_bytes: v[18],
            conntrack_early_drop: v[19],
            ..Counters::default()
        };
        c.drops
            .copy_from_slice(&v[FIXED..FIXED + DropReason::COUNT]);
        let d = &v[FIXED + DropReason::COUNT..];
        c.device = pktio::DeviceStats {
            tx_ring_full: d[0],
            alloc_failed: d[1],
            wakeups: d[2],
            kernel_rx_dropped: d[3],
            kernel_rx_ring_full: d[4],
            kernel_rx_invalid: d[5],
            kernel_tx_invalid: d[6],
            kernel_fill_empty: d[7],
            frames_lost: d[8],
            ..pktio::DeviceStats::default()
        };
        c
    }
}
