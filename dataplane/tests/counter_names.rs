//! Every worker counter reaches a scraper under its own name: a worker's counters, each set
//! to a value of its own, published as a worker publishes them, asked for as `kxdp stats`
//! and control's metrics ask (`GetStats` through the socket's encoding) and decoded as they
//! decode it. The expected names are written out here by hand, apart from the declaration
//! in `counters.rs`, because they are what dashboards and scripts read.

use std::collections::BTreeMap;
use std::time::Instant;

use dataplane::counters::{Counters, DropReason};
use dataplane::state::{Limits, Shared};
use nat::wire::{self, Message};

/// Counters with every published value distinct (drops from 100, the device's from 200);
/// the device's unpublished frame counts too, so that one leaking into a slot shows.
fn distinct() -> Counters {
    Counters {
        rx: 1,
        tx: 2,
        rx_bytes: 3,
        tx_bytes: 4,
        arp_replies: 5,
        arp_requests: 6,
        nat_new: 7,
        nat_hits: 8,
        rejects: 9,
        routed: 10,
        encapsulated: 11,
        decapsulated: 12,
        too_big: 13,
        time_exceeded: 14,
        echo_replies: 15,
        masqueraded_out: 16,
        to_host: 17,
        tracked_new: 18,
        untracked: 19,
        conntrack_early_drop: 20,
        awake_ns: 21,
        asleep_ns: 22,
        sleeps: 23,
        poll_gaps_over_100us: 24,
        poll_gaps_over_1ms: 25,
        rx_wait_timed: 26,
        rx_wait_ns: 27,
        rx_waited_over_10us: 28,
        rx_waited_over_20us: 29,
        rx_waited_over_50us: 30,
        rx_waited_over_100us: 31,
        rx_waited_over_200us: 32,
        rx_waited_over_500us: 33,
        rx_waited_over_1ms: 34,
        rx_waited_over_5ms: 35,
        drops: std::array::from_fn(|i| 100 + i as u64),
        device: pktio::DeviceStats {
            rx_frames: 998,
            tx_frames: 999,
            tx_ring_full: 201,
            alloc_failed: 202,
            wakeups: 203,
            kernel_rx_dropped: 204,
            kernel_rx_ring_full: 205,
            kernel_rx_invalid: 206,
            kernel_tx_invalid: 207,
            kernel_fill_empty: 208,
            frames_lost: 209,
            busy_polls: 210,
        },
    }
}

/// What a scraper must see for [`distinct`].
fn expected() -> BTreeMap<String, u64> {
    let plain = [
        ("rx", 1),
        ("tx", 2),
        ("rx_bytes", 3),
        ("tx_bytes", 4),
        ("arp_replies", 5),
        ("arp_requests", 6),
        ("nat_new", 7),
        ("nat_hits", 8),
        ("rejects", 9),
        ("routed", 10),
        ("encapsulated", 11),
        ("decapsulated", 12),
        ("too_big", 13),
        ("time_exceeded", 14),
        ("echo_replies", 15),
        ("masqueraded_out", 16),
        ("to_host", 17),
        ("tracked_new", 18),
        ("untracked", 19),
        ("conntrack_early_drop", 20),
        ("awake_ns", 21),
        ("asleep_ns", 22),
        ("sleeps", 23),
        ("poll_gaps_over_100us", 24),
        ("poll_gaps_over_1ms", 25),
        ("rx_wait_timed", 26),
        ("rx_wait_ns", 27),
        ("rx_waited_over_10us", 28),
        ("rx_waited_over_20us", 29),
        ("rx_waited_over_50us", 30),
        ("rx_waited_over_100us", 31),
        ("rx_waited_over_200us", 32),
        ("rx_waited_over_500us", 33),
        ("rx_waited_over_1ms", 34),
        ("rx_waited_over_5ms", 35),
        ("dev_tx_ring_full", 201),
        ("dev_alloc_failed", 202),
        ("dev_wakeups", 203),
        ("kernel_rx_dropped", 204),
        ("kernel_rx_ring_full", 205),
        ("kernel_rx_invalid", 206),
        ("kernel_tx_invalid", 207),
        ("kernel_fill_empty", 208),
        ("dev_frames_lost", 209),
        ("dev_busy_polls", 210),
    ];
    let drops = DropReason::ALL
        .iter()
        .map(|r| (format!("drop_{}", r.label()), 100 + *r as u64));
    plain
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .chain(drops)
        .collect()
}

#[test]
fn every_counter_reaches_a_scraper_under_its_own_name() {
    let shared = Shared::new(vec![], 2, Limits::default());
    shared.counters[1].publish(&distinct());
    let answer = dataplane::server::handle(Message::GetStats, &shared, Instant::now());
    // Through the socket's encoding, as kxdp-control and `kxdp stats` receive it.
    let answer = wire::read_message(&mut &wire::encode(&answer)[..]).unwrap();
    let stats = ctlclient::DataplaneStats::from_answer(answer).unwrap();
    assert_eq!(stats.workers.len(), 2);
    let seen = &stats.workers[1];
    let by_name: BTreeMap<String, u64> = seen.iter().cloned().collect();
    assert_eq!(by_name.len(), seen.len(), "a name given twice: {seen:?}");
    assert_eq!(by_name, expected());
    // The worker that published nothing reads zero under the same names.
    let idle = &stats.workers[0];
    assert!(idle.iter().all(|(_, v)| *v == 0), "{idle:?}");
    assert_eq!(
        idle.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        seen.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
}

#[test]
fn a_read_gives_back_every_published_value() {
    let published = dataplane::counters::Published::default();
    let c = distinct();
    published.publish(&c);
    let read = published.read();
    assert_eq!(read.named(), c.named());
    // The device's frame counts are not published: they read as zero.
    assert_eq!((read.device.rx_frames, read.device.tx_frames), (0, 0));
}
