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

/// Declares every counter once. A plain counter is one line (its doc and field): its name in
/// `kxdp stats` and in control's metrics (`kxdp_worker_<name>`, but for `rx`/`tx` and
/// `rx_bytes`/`tx_bytes`, which control labels by direction) is the field's name. A device
/// counter is its [`pktio::DeviceStats`] field and its published name. From this one list
/// come the struct, its `Default`, [`Counters::named`] and the published slots, all in one
/// order, so a value can never be read under another counter's name.
macro_rules! counters {
    (
        plain { $($(#[doc = $doc:literal])* $field:ident,)* }
        device { $($dev:ident => $dev_name:literal,)* }
    ) => {
        /// One worker's counters. Only that worker writes them.
        #[derive(Clone, Debug)]
        #[repr(align(64))]
        pub struct Counters {
            $($(#[doc = $doc])* pub $field: u64,)*
            /// Drops, indexed by [`DropReason`].
            pub drops: [u64; DropReason::COUNT],
            /// The device's own counters (TX ring full, pool empty, the kernel's XDP
            /// statistics), refreshed at housekeeping; those named in `device { .. }` are
            /// published.
            pub device: pktio::DeviceStats,
        }

        impl Default for Counters {
            fn default() -> Self {
                Counters {
                    $($field: 0,)*
                    drops: [0; DropReason::COUNT],
                    device: pktio::DeviceStats::default(),
                }
            }
        }

        /// The plain counters, then one per drop reason, then the device's: the order of
        /// [`Counters::named`] and of the published slots.
        const SLOTS: usize = [$(stringify!($field),)*].len()
            + DropReason::COUNT
            + [$($dev_name,)*].len();

        impl Counters {
            /// Every published value, in slot order.
            fn slots(&self) -> impl Iterator<Item = u64> {
                [$(self.$field,)*]
                    .into_iter()
                    .chain(self.drops)
                    .chain([$(self.device.$dev,)*])
            }

            /// Every published value's place, in slot order.
            fn slots_mut(&mut self) -> impl Iterator<Item = &mut u64> {
                let Counters { $($field,)* drops, device } = self;
                [$($field,)*]
                    .into_iter()
                    .chain(drops.iter_mut())
                    .chain([$(&mut device.$dev,)*])
            }

            /// Every published value's name (in `kxdp stats` and, through control, in the
            /// metrics), in slot order.
            fn slot_names() -> impl Iterator<Item = String> {
                [$(stringify!($field),)*]
                    .into_iter()
                    .map(str::to_string)
                    .chain(DropReason::ALL.iter().map(|r| format!("drop_{}", r.label())))
                    .chain([$($dev_name,)*].into_iter().map(str::to_string))
            }
        }
    };
}

counters! {
    plain {
        /// Frames received.
        rx,
        /// Frames transmitted (forwarded or built).
        tx,
        /// Bytes of the frames received (Ethernet frames without FCS).
        rx_bytes,
        /// Bytes of the frames transmitted.
        tx_bytes,
        /// ARP requests and IPv6 neighbour solicitations answered.
        arp_replies,
        /// ARP requests and neighbour solicitations sent to resolve a neighbour.
        arp_requests,
        /// New Service connections translated.
        nat_new,
        /// Packets of tracked connections translated.
        nat_hits,
        /// Connections rejected for lack of endpoints (ICMP / RST sent).
        rejects,
        /// Packets routed without translation.
        routed,
        /// Packets sent into the overlay (VXLAN encapsulated).
        encapsulated,
        /// Packets taken out of the overlay.
        decapsulated,
        /// ICMP fragmentation-needed / packet-too-big sent.
        too_big,
        /// ICMP time exceeded sent (a TTL ran out here).
        time_exceeded,
        /// Echo requests to the pods' gateway answered.
        echo_replies,
        /// New pod connections masqueraded out of the cluster (ipMasq).
        masqueraded_out,
        /// Packets for the node's own addresses handed to its kernel (host port).
        to_host,
        /// New untranslated connections of local pods tracked (with their policy verdict).
        tracked_new,
        /// New connections of local pods, isolated by no policy, forwarded untracked because
        /// the connection table refused them (full, or their reply tuple taken).
        untracked,
        /// Connections evicted to make room for a new one, as the kernel's `early_drop`: not
        /// assured (handshake unfinished, datagrams one way) or expired unswept, when the table
        /// or a tuple's index windows were full or every masquerade port tried was taken.
        conntrack_early_drop,
        /// Nanoseconds the worker was awake (polling, with or without traffic).
        awake_ns,
        /// Nanoseconds the worker slept, waiting for a frame (`--poll-mode` adaptive or
        /// interrupt).
        asleep_ns,
        /// Times the worker went to sleep.
        sleeps,
        /// Times more than 100 µs passed between the end of one pass of an awake worker
        /// and the start of the next: it was off its core (preempted, or its core's time
        /// taken by interrupts), and frames waited.
        poll_gaps_over_100us,
        /// Of those, the ones over a millisecond: the latency tail's own count.
        poll_gaps_over_1ms,
        /// Frames whose wait in the receive ring was measured (`--measure-ring-wait`): the
        /// time from kxdp's XDP program seeing the frame to the worker taking it from the
        /// ring, the part of a packet's latency that is the worker's.
        rx_wait_timed,
        /// Their waits summed, in nanoseconds (over `rx_wait_timed`: the mean).
        rx_wait_ns,
        /// Of the frames timed, those that waited over 10 µs.
        rx_waited_over_10us,
        /// ... over 20 µs.
        rx_waited_over_20us,
        /// ... over 50 µs.
        rx_waited_over_50us,
        /// ... over 100 µs.
        rx_waited_over_100us,
        /// ... over 200 µs.
        rx_waited_over_200us,
        /// ... over 500 µs.
        rx_waited_over_500us,
        /// ... over a millisecond.
        rx_waited_over_1ms,
        /// ... over 5 ms.
        rx_waited_over_5ms,
    }
    device {
        tx_ring_full => "dev_tx_ring_full",
        alloc_failed => "dev_alloc_failed",
        wakeups => "dev_wakeups",
        kernel_rx_dropped => "kernel_rx_dropped",
        kernel_rx_ring_full => "kernel_rx_ring_full",
        kernel_rx_invalid => "kernel_rx_invalid",
        kernel_tx_invalid => "kernel_tx_invalid",
        kernel_fill_empty => "kernel_fill_empty",
        frames_lost => "dev_frames_lost",
        busy_polls => "dev_busy_polls",
    }
}

impl Counters {
    /// Counts a drop.
    #[inline]
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }

    /// Counts a frame that waited `ns` in its receive ring.
    #[inline]
    pub fn rx_waited(&mut self, ns: u64) {
        self.rx_wait_timed += 1;
        self.rx_wait_ns += ns;
        for (over, count) in [
            (10_000, &mut self.rx_waited_over_10us),
            (20_000, &mut self.rx_waited_over_20us),
            (50_000, &mut self.rx_waited_over_50us),
            (100_000, &mut self.rx_waited_over_100us),
            (200_000, &mut self.rx_waited_over_200us),
            (500_000, &mut self.rx_waited_over_500us),
            (1_000_000, &mut self.rx_waited_over_1ms),
            (5_000_000, &mut self.rx_waited_over_5ms),
        ] {
            if ns <= over {
                break;
            }
            *count += 1;
        }
    }

    /// Total drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Named values, for the stats message and printing: the plain counters, then
    /// `drop_<reason>` for each [`DropReason`], then the device's.
    pub fn named(&self) -> Vec<(String, u64)> {
        Counters::slot_names().zip(self.slots()).collect()
    }
}

/// Where a worker publishes its counters for readers on other threads.
pub struct Published {
    values: [AtomicU64; SLOTS],
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
        for (slot, v) in self.values.iter().zip(c.slots()) {
            slot.store(v, Ordering::Relaxed);
        }
    }

    /// Reads the last published values.
    pub fn read(&self) -> Counters {
        let mut c = Counters::default();
        for (v, slot) in c.slots_mut().zip(&self.values) {
            *v = slot.load(Ordering::Relaxed);
        }
        c
    }
}
