//! Conntrack costs per operation at 1k, 100k and 1M live connections in a table of 2^20:
//! a lookup that hits (what every packet of an established flow pays), a lookup that
//! misses (what every new flow pays before the Service lookup), an insert and remove (a
//! new flow's entry and its expiry), lookups from two threads on one table (the workers
//! share it), a worker's mix (a lookup, an insert and a remove) on one thread and on two
//! at once, and bursts: of 32 and 64 lookups through `get_bulk` and one `get` at a time,
//! of 32 inserts through `insert_bulk` and one `insert` at a time. Last, the machine's
//! own cost of a random line (`memory`), the floor under a large table's lookups.
//!
//! Keys are visited in a scattered order, so the larger tables measure cache misses
//! rather than one hot entry. Settings keep the whole file near a minute on two cores:
//! `cargo bench -p nat --bench conntrack` (add `-- --quick` for a faster, rougher run;
//! a filter such as `-- bulk` runs some only).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nat::conntrack::{Connection, Conntrack, FlowKey, Hit};

/// The table's capacity: the dataplane's default (`Limits::conntrack_capacity`).
const CAPACITY: usize = 1 << 20;
/// Live connections the table holds while it is measured.
const SIZES: [u32; 3] = [1_000, 100_000, 1_000_000];
/// Expiry far beyond any benchmark, so nothing expires while it is measured.
const TIMEOUT: u64 = u64::MAX / 4;
/// The time every operation runs at.
const NOW: u64 = 1;
/// Burst sizes of the bulk lookups: `nat`'s `BULK` group and a receive burst (`BURST`).
const BURSTS: [usize; 2] = [32, 64];

/// Connection `i` from client 10.0.0.0 + i to a ClusterIP, DNATed to a backend. `dport`
/// tells the populations apart: the prefill uses 80, lookups that must miss 81, the
/// insert-and-remove cycle 82, the mix's threads 83 and 84, bursts of new flows 85.
fn conn(i: u32, dport: u16) -> Connection {
    let client = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
    let original = FlowKey {
        proto: 6,
        src: client,
        dst: IpAddr::V4(Ipv4Addr::new(172, 30, 0, 41)),
        sport: 40000,
        dport,
    };
    let reply = FlowKey {
        proto: 6,
        src: IpAddr::V4(Ipv4Addr::new(10, 244, 1, 5)),
        dst: client,
        sport: 8080,
        dport: 40000,
    };
    Connection {
        original,
        reply,
        service: 1,
        policy: 0,
    }
}

/// A table holding `n` live connections, and the end of the range of `i` they were drawn
/// from. Near a million entries some tuples are refused (`Full`: their index window is
/// taken although the table has room); those are skipped, so a few lookups in the range
/// miss.
fn table(n: u32) -> (Conntrack, u32) {
    let ct = Conntrack::new(CAPACITY);
    let start = Instant::now();
    let (mut i, mut refused) = (0u32, 0u32);
    while ct.len() < n as usize {
        if ct.insert(conn(i, 80), NOW, TIMEOUT).is_err() {
            refused += 1;
        }
        i += 1;
    }
    eprintln!(
        "prefill of {n} connections: {:.2?}, {refused} tuples refused as Full",
        start.elapsed()
    );
    (ct, i)
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
    for n in SIZES {
        let (ct, range) = table(n);

        let mut g = c.benchmark_group("conntrack");
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .throughput(Throughput::Elements(1));

        g.bench_with_input(BenchmarkId::new("lookup_hit", n), &range, |b, &n| {
            let mut s = Scatter(1);
            b.iter(|| {
                let c = conn(s.next(n), 80);
                black_box(ct.lookup(black_box(&c.original), NOW, TIMEOUT))
            })
        });

        g.bench_with_input(BenchmarkId::new("lookup_miss", n), &n, |b, &n| {
            let mut s = Scatter(2);
            b.iter(|| {
                let c = conn(s.next(n), 81);
                black_box(ct.lookup(black_box(&c.original), NOW, TIMEOUT))
            })
        });

        // Tuples of their own, each inserted and removed again, so the table stays at `n`
        // live connections.
        g.bench_with_input(BenchmarkId::new("insert_remove", n), &n, |b, _| {
            let mut i = 0u32;
            b.iter(|| {
                i = (i + 1) % 1_000_000;
                let c = conn(i, 82);
                black_box(ct.insert(black_box(c), NOW, TIMEOUT).ok());
                black_box(ct.remove(&c))
            })
        });

        // Two threads looking up at once; one iteration is one lookup on each, so the
        // throughput is the pair's combined rate (compare with `lookup_hit`). Thread
        // start-up is inside the measured time but amortised over each sample's batch.
        g.throughput(Throughput::Elements(2));
        g.bench_with_input(
            BenchmarkId::new("lookup_hit_2threads", n),
            &range,
            |b, &n| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    std::thread::scope(|scope| {
                        for seed in [3, 4] {
                            let ct = &ct;
                            scope.spawn(move || {
                                let mut s = Scatter(seed);
                                for _ in 0..iters {
                                    let c = conn(s.next(n), 80);
                                    black_box(ct.lookup(black_box(&c.original), NOW, TIMEOUT));
                                }
                            });
                        }
                    });
                    start.elapsed()
                })
            },
        );

        // A worker's mix: a lookup that hits, then a new flow's insert and its removal,
        // on one thread and on two at once (tuples of each thread's own). One iteration
        // is one mix on each thread, so the time per iteration of `mix_2threads` against
        // `mix_1thread` is how much each thread slows down when sharing the table.
        g.throughput(Throughput::Elements(1));
        for threads in [1u32, 2] {
            let name = format!("mix_{threads}thread{}", if threads > 1 { "s" } else { "" });
            g.bench_with_input(BenchmarkId::new(name, n), &range, |b, &n| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    std::thread::scope(|scope| {
                        for t in 0..threads {
                            let ct = &ct;
                            scope.spawn(move || mix(ct, n, t, iters));
                        }
                    });
                    start.elapsed()
                })
            });
        }
        g.finish();

        // Bursts of scattered hits, through `get_bulk` and one `get` after the other;
        // the throughput is per key.
        let mut g = c.benchmark_group("conntrack_burst");
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        for burst in BURSTS {
            g.throughput(Throughput::Elements(burst as u64));
            let mut keys = vec![conn(0, 80).original; burst];
            let mut out: Vec<Option<Hit>> = vec![None; burst];
            let id = format!("{n}/{burst}");
            g.bench_function(BenchmarkId::new("get_bulk", &id), |b| {
                let mut s = Scatter(5);
                b.iter(|| {
                    for k in keys.iter_mut() {
                        *k = conn(s.next(range), 80).original;
                    }
                    ct.get_bulk(black_box(&keys), NOW, &mut out);
                    black_box(&out);
                })
            });
            g.bench_function(BenchmarkId::new("get_one_by_one", &id), |b| {
                let mut s = Scatter(5);
                b.iter(|| {
                    for k in keys.iter_mut() {
                        *k = conn(s.next(range), 80).original;
                    }
                    for (k, o) in black_box(&keys).iter().zip(out.iter_mut()) {
                        *o = ct.get(k, NOW);
                    }
                    black_box(&out);
                })
            });
        }

        // Bursts of new flows (tuples of their own, removed again one by one so the table
        // stays at `n`), through `insert_bulk` and one `insert` after the other; the
        // throughput is per connection, the time includes the removals.
        let burst = BURSTS[0];
        g.throughput(Throughput::Elements(burst as u64));
        let mut res = vec![Ok(0); burst];
        for bulk in [true, false] {
            let name = if bulk {
                "insert_bulk"
            } else {
                "insert_one_by_one"
            };
            let mut i = 0u32;
            g.bench_function(BenchmarkId::new(name, format!("{n}/{burst}")), |b| {
                b.iter(|| {
                    let conns: [Connection; BURSTS[0]] = std::array::from_fn(|_| {
                        i = (i + 1) % 1_000_000;
                        conn(i, 85)
                    });
                    if bulk {
                        ct.insert_bulk(black_box(&conns), NOW, TIMEOUT, &mut res);
                    } else {
                        for (c, r) in conns.iter().zip(res.iter_mut()) {
                            *r = ct.insert(black_box(*c), NOW, TIMEOUT);
                        }
                    }
                    for c in &conns {
                        black_box(ct.remove(c));
                    }
                    black_box(&res);
                })
            });
        }
        g.finish();
    }
}

/// `iters` rounds of a worker's mix on `ct` as thread `t`: a lookup of one of the first
/// `n` prefilled connections, then an insert of a tuple of the thread's own (dport
/// 83 + t) and its removal, so the table stays at its size.
fn mix(ct: &Conntrack, n: u32, t: u32, iters: u64) {
    let mut s = Scatter(6 + t as u64);
    for i in 0..iters {
        let c = conn(s.next(n), 80);
        black_box(ct.lookup(black_box(&c.original), NOW, TIMEOUT));
        let c = conn((i % 1_000_000) as u32, 83 + t as u16);
        black_box(ct.insert(black_box(c), NOW, TIMEOUT).ok());
        black_box(ct.remove(&c));
    }
}

/// The machine's floor under the lookups of a large table: random 64-byte lines of an
/// array the size of a full table's (128 MiB), read one after the other with each address
/// taken from the line before (what a lookup's chain of misses costs when nothing
/// overlaps) and in groups of [`nat::conntrack::BULK`] independent reads (what a bulk
/// lookup can overlap at best); the throughput is per line.
fn memory(c: &mut Criterion) {
    const LINES: usize = (128 << 20) / 64;
    let mut lines = vec![[0u64; 8]; LINES];
    // Every line in a shuffled order, each naming the next: one cycle through all of them,
    // so the chain never repeats a short loop the caches could hold.
    let mut order: Vec<u32> = (0..LINES as u32).collect();
    let mut s = Scatter(9);
    for i in (1..LINES).rev() {
        order.swap(i, s.next(i as u32) as usize);
    }
    for (i, line) in order.iter().enumerate() {
        lines[*line as usize][0] = u64::from(order[(i + 1) % LINES]);
    }
    let mut g = c.benchmark_group("memory");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(1));
    let mut at = u64::from(order[0]);
    g.bench_function("dependent_line", |b| {
        b.iter(|| {
            at = lines[at as usize][0];
            black_box(at)
        })
    });
    g.throughput(Throughput::Elements(nat::conntrack::BULK as u64));
    let mut s = Scatter(10);
    g.bench_function("independent_lines_32", |b| {
        b.iter(|| {
            let mut x = 0;
            for _ in 0..nat::conntrack::BULK {
                x ^= lines[s.next(LINES as u32) as usize][1];
            }
            black_box(x)
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    // Fewer bootstrap resamples and no plots: the analysis otherwise takes longer than
    // the measurements on this 2-core machine.
    config = Criterion::default().nresamples(10_000).without_plots();
    targets = bench, memory
}
criterion_main!(benches);
