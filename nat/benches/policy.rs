//! The NetworkPolicy decision a new connection pays, with 10, 1k and 10k policies that all
//! select the probed pod, so its rule set grows with them (two or three rules per policy:
//! eight pod peers as /32s on two TCP port ranges, an ipBlock /24 minus a /28 on a UDP
//! range, and on every tenth policy one peer on every port). The peers of the probes are
//! drawn from all policies in a scattered order, so the larger tables measure cache misses
//! rather than one hot entry.
//!
//! Decisions: allowed by a /32 pod peer (scattered, and one peer over and over, which
//! shows the work without the cache misses), allowed by an ipBlock prefix, denied for a
//! peer no rule names (every prefix length probed), denied for a known peer on another
//! port, and an address no isolated pod has (one hash miss). `build` is the compilation of
//! the whole spec, which control's changes pay, not connections.
//!
//! `cargo bench -p nat --bench policy -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ipnet::{IpNet, Ipv4Net};
use nat::policy::{subtract, PolicyTable, Verdict};
use nat::spec::{IsolationSpec, PodPolicySpec, PolicySpec, PortRangeSpec, Protocol, RuleSpec};

/// Policies in the cluster; every one selects the probed pod.
const SIZES: [u32; 3] = [10, 1_000, 10_000];
/// Pods of the node. Pod 0 is the probed one; policy `j` also selects pod `1 + j % 99`.
const LOCAL_PODS: u32 = 100;
/// Pod peers per policy, each a /32.
const PEERS_PER_POLICY: u32 = 8;

fn v4(x: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(x))
}

fn pod_ip(i: u32) -> IpAddr {
    v4(0x0af4_0100 + i) // 10.244.1.0 + i
}

/// The `k`th pod peer of policy `j`: 10.1.0.0 + 8j + k.
fn peer_ip(j: u32, k: u32) -> IpAddr {
    v4(0x0a01_0000 + j * PEERS_PER_POLICY + k)
}

/// The TCP port policy `j` allows its pod peers on (besides 9000–9099).
fn pod_port(j: u32) -> u16 {
    8000 + (j % 1000) as u16
}

fn range(protocol: Protocol, first: u16, last: u16) -> PortRangeSpec {
    PortRangeSpec {
        protocol,
        first,
        last,
    }
}

fn rules(j: u32) -> Vec<RuleSpec> {
    let block = Ipv4Net::new(Ipv4Addr::new(172, 16, (j % 256) as u8, 0), 24).expect("/24");
    let except = Ipv4Net::new(Ipv4Addr::new(172, 16, (j % 256) as u8, 16), 28).expect("/28");
    let mut out = vec![
        RuleSpec {
            policy: j,
            peers: Some(
                (0..PEERS_PER_POLICY)
                    .map(|k| IpNet::from(peer_ip(j, k)))
                    .collect(),
            ),
            ports: Some(vec![
                range(Protocol::Tcp, pod_port(j), pod_port(j)),
                range(Protocol::Tcp, 9000, 9099),
            ]),
        },
        RuleSpec {
            policy: j,
            peers: Some(subtract(block.into(), &[except.into()])),
            ports: Some(vec![range(
                Protocol::Udp,
                1000 + (j % 100) as u16,
                2000 + (j % 100) as u16,
            )]),
        },
    ];
    if j.is_multiple_of(10) {
        out.push(RuleSpec {
            policy: j,
            peers: Some(vec![IpNet::from(v4(0xc633_6400 + j % 256))]), // 198.51.100.x
            ports: None,
        });
    }
    out
}

fn spec(policies: u32) -> PolicySpec {
    let mut pods: Vec<PodPolicySpec> = (0..LOCAL_PODS)
        .map(|i| PodPolicySpec {
            pod: format!("bench/pod-{i}"),
            ips: vec![pod_ip(i)],
            ingress: None,
            egress: None,
        })
        .collect();
    for j in 0..policies {
        let rules = rules(j);
        for i in [0, 1 + j % (LOCAL_PODS - 1)] {
            let iso = pods[i as usize]
                .ingress
                .get_or_insert_with(IsolationSpec::default);
            iso.policies.push(j);
            iso.rules.extend(rules.iter().cloned());
        }
    }
    PolicySpec {
        policies: (0..policies).map(|j| format!("bench/policy-{j}")).collect(),
        pods,
    }
}

/// Scattered indices in `0..n`: a 64-bit LCG (Knuth's MMIX constants), high bits kept.
struct Scatter(u64);

impl Scatter {
    fn next(&mut self, n: u32) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 32) % n as u64) as u32
    }
}

fn bench(c: &mut Criterion) {
    let pod = pod_ip(0);
    for n in SIZES {
        let spec = spec(n);
        let table = PolicyTable::build(&spec);
        // The verdicts measured are the ones meant.
        assert_eq!(
            table.ingress(pod, peer_ip(n - 1, 3), Protocol::Tcp, pod_port(n - 1)),
            Verdict::Allowed { policy: n - 1 }
        );
        assert_eq!(
            table.ingress(pod, peer_ip(n - 1, 3), Protocol::Tcp, 22),
            Verdict::Denied
        );
        assert_eq!(
            table.ingress(pod, v4(0xc000_0201), Protocol::Tcp, 80),
            Verdict::Denied
        );

        let mut g = c.benchmark_group("policy");
        g.throughput(Throughput::Elements(1));

        g.bench_with_input(BenchmarkId::new("allow_pod_peer", n), &n, |b, &n| {
            let mut s = Scatter(1);
            b.iter(|| {
                let j = s.next(n);
                let peer = peer_ip(j, j % PEERS_PER_POLICY);
                black_box(table.ingress(black_box(pod), peer, Protocol::Tcp, pod_port(j)))
            })
        });

        // One peer again and again: the work of a decision without the cache misses of a
        // large table.
        g.bench_with_input(BenchmarkId::new("allow_same_peer", n), &n, |b, &n| {
            let j = n / 2;
            let peer = peer_ip(j, 5);
            b.iter(|| {
                black_box(table.ingress(
                    black_box(pod),
                    black_box(peer),
                    Protocol::Tcp,
                    pod_port(j),
                ))
            })
        });

        g.bench_with_input(BenchmarkId::new("allow_ip_block", n), &n, |b, &n| {
            let mut s = Scatter(2);
            b.iter(|| {
                let j = s.next(n);
                let peer = v4(0xac10_00c8 + ((j % 256) << 8)); // 172.16.x.200
                black_box(table.ingress(black_box(pod), peer, Protocol::Udp, 1500))
            })
        });

        g.bench_with_input(BenchmarkId::new("deny_unknown_peer", n), &n, |b, _| {
            let mut s = Scatter(3);
            b.iter(|| {
                let peer = v4(0xc000_0200 + s.next(256)); // 192.0.2.x
                black_box(table.ingress(black_box(pod), peer, Protocol::Tcp, 80))
            })
        });

        g.bench_with_input(BenchmarkId::new("deny_other_port", n), &n, |b, &n| {
            let mut s = Scatter(4);
            b.iter(|| {
                let j = s.next(n);
                let peer = peer_ip(j, j % PEERS_PER_POLICY);
                black_box(table.ingress(black_box(pod), peer, Protocol::Tcp, 22))
            })
        });

        g.bench_with_input(BenchmarkId::new("not_isolated", n), &n, |b, _| {
            let mut s = Scatter(5);
            b.iter(|| {
                let other = pod_ip(LOCAL_PODS + 1 + s.next(100));
                black_box(table.ingress(black_box(other), pod, Protocol::Tcp, 80))
            })
        });
        g.finish();

        let mut g = c.benchmark_group("policy_build");
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("build", n), &spec, |b, spec| {
            b.iter(|| black_box(PolicyTable::build(black_box(spec))))
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    // Fewer bootstrap resamples and no plots: the analysis otherwise takes longer than
    // the measurements on this 2-core machine.
    config = Criterion::default().nresamples(10_000).without_plots();
    targets = bench
}
criterion_main!(benches);
