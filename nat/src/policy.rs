//! NetworkPolicy verdicts for new connections, compiled from a [`PolicySpec`].
//!
//! The dataplane asks once per new connection (replies and later packets ride on
//! conntrack): for ingress, "may `peer` open a connection to this pod's `port`?", for
//! egress, "may this pod open one to `peer`:`port`?" (the destination after Service
//! translation). A pod that no policy selects for that direction is [`Verdict::NotIsolated`];
//! an isolated pod is [`Verdict::Allowed`] when any rule of any selecting policy matches
//! (rules are a union), naming the lowest such policy, and [`Verdict::Denied`] otherwise.
//!
//! # Layout and cost
//!
//! Every (pod, direction, address family) is a *rule set*. At build time each rule's peer
//! prefixes are spread into one hash map per family, keyed by (pod and direction, prefix
//! length, masked address); a rule without peers goes in the /0 entry. The value is the
//! port table of that prefix: the union of every rule's port ranges flattened into disjoint
//! ranges sorted by (protocol, first port), each carrying the lowest policy that allows
//! it, and the lowest policy whose rule has no ports at all. Each rule set lists the
//! distinct prefix lengths it uses, longest first.
//!
//! A decision costs one hash lookup for the pod address, then one hash lookup per distinct
//! prefix length of that rule set (every matching prefix counts, not only the longest, so
//! all lengths are probed; in practice a handful: /32 or /128 pod peers, the lengths an
//! ipBlock splits into, /0), and a binary search of the port table of each hit:
//! `O(L · log R)` with `L` ≤ 33 (IPv4) or 129 (IPv6) distinct lengths and `R` port ranges
//! at that prefix. The number of policies and rules does not enter except through `log R`
//! and through the size of the maps (cache misses). The search stops early once it has
//! found the lowest policy the rule set can answer. Nothing allocates.
//!
//! Memory is per pod: a policy selecting many pods of the node is stored once per pod.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::spec::{IsolationSpec, PolicySpec, Protocol, RuleSpec};
use crate::tables::BuildFastHasher;

/// "No policy": larger than every policy index.
const NONE: u32 = u32::MAX;

/// What NetworkPolicy decides for a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// No policy selects the pod for this direction: everything is allowed.
    NotIsolated,
    /// A rule allows it; `policy` is the lowest index (in [`PolicySpec::policies`]) among
    /// the policies with a matching rule.
    Allowed {
        /// Index of the allowing policy.
        policy: u32,
    },
    /// The pod is isolated for this direction and no rule matches.
    Denied,
}

impl Verdict {
    /// Whether the connection must be dropped.
    pub fn is_denied(self) -> bool {
        self == Verdict::Denied
    }
}

/// The direction of traffic a policy governs (`spec.policyTypes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyType {
    /// Connections into the pod; the peer is the client.
    Ingress,
    /// Connections the pod opens; the peer is the destination after Service translation.
    Egress,
}

/// Why a pod gets its verdict, for inspection tools.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Explanation<'a> {
    /// The pod (`namespace/name`) owning the address asked about, if it is isolated in
    /// some direction; `None` for an address no isolated pod of this node has.
    pub pod: Option<&'a str>,
    /// Every policy selecting the pod for this direction, ascending (empty when it is not
    /// isolated for it).
    pub policies: &'a [u32],
    /// The verdict; [`Verdict::Allowed`] names the first policy that allows.
    pub verdict: Verdict,
}

/// The port table of one prefix: flattened ranges and the lowest port-less policy.
#[derive(Clone, Copy, Debug)]
struct PeerEntry {
    /// Lowest policy with a rule for this prefix that has no ports; [`NONE`] if none.
    any_port: u32,
    /// This prefix's ranges in [`PolicyTable::ranges`].
    first_range: u32,
    /// End (excluded) of this prefix's ranges.
    end_range: u32,
}

/// A port range after flattening: disjoint from its neighbours of the same protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PortRange {
    protocol: Protocol,
    first: u16,
    last: u16,
    /// The lowest policy allowing every port of the range.
    policy: u32,
}

/// An address as a prefix key holds it: `u32` for IPv4 (a 12-byte key, so the large IPv4
/// map stays compact), `u128` for IPv6.
trait Bits: Copy + Eq + std::fmt::Debug {
    /// Address length in bits.
    const LEN: u8;
    /// The first `len` bits, the rest zero.
    fn mask(self, len: u8) -> Self;
    /// 64 bits for hashing.
    fn fold(self) -> u64;
}

impl Bits for u32 {
    const LEN: u8 = 32;
    #[inline]
    fn mask(self, len: u8) -> u32 {
        match Self::LEN.checked_sub(len) {
            Some(host) if host < Self::LEN => self >> host << host,
            _ => 0,
        }
    }
    #[inline]
    fn fold(self) -> u64 {
        self as u64
    }
}

impl Bits for u128 {
    const LEN: u8 = 128;
    #[inline]
    fn mask(self, len: u8) -> u128 {
        match Self::LEN.checked_sub(len) {
            Some(host) if host < Self::LEN => self >> host << host,
            _ => 0,
        }
    }
    #[inline]
    fn fold(self) -> u64 {
        self as u64 ^ ((self >> 64) as u64).rotate_left(29)
    }
}

/// Key of the prefix maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PrefixKey<A> {
    /// Rule set id: `pod * 2 + direction`.
    set: u32,
    /// Prefix length.
    len: u8,
    /// The address masked to `len` bits.
    addr: A,
}

impl<A: Bits> Hash for PrefixKey<A> {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        // One mixed word: the map's multiply-only hasher keeps the low zero bits of short
        // prefixes in the bucket bits, which would pile /16s into a few buckets.
        let x = self.addr.fold() ^ ((self.set as u64) << 40 | (self.len as u64) << 32);
        let x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        state.write_u64(x ^ (x >> 31));
    }
}

type PrefixMap<A> = HashMap<PrefixKey<A>, PeerEntry, BuildFastHasher>;

/// The rules of one pod, direction and address family.
#[derive(Clone, Copy, Debug, Default)]
struct RuleSet {
    /// `pod * 2 + direction`, the set part of its prefix keys.
    id: u32,
    /// Distinct prefix lengths in [`PolicyTable::lengths`], longest first.
    first_len: u32,
    end_len: u32,
    /// The lowest policy any rule of the set names; a search that found it is done.
    min_policy: u32,
}

/// One direction of one pod.
#[derive(Clone, Debug)]
struct Isolation {
    policies: Vec<u32>,
    v4: RuleSet,
    v6: RuleSet,
}

#[derive(Clone, Debug)]
struct Pod {
    name: String,
    ingress: Option<Isolation>,
    egress: Option<Isolation>,
}

/// NetworkPolicy compiled for lookups; immutable once built, swapped whole like the
/// Service table.
#[derive(Clone, Debug, Default)]
pub struct PolicyTable {
    policies: Vec<String>,
    pod_by_ip: HashMap<IpAddr, u32, BuildFastHasher>,
    pods: Vec<Pod>,
    lengths: Vec<u8>,
    prefixes_v4: PrefixMap<u32>,
    prefixes_v6: PrefixMap<u128>,
    ranges: Vec<PortRange>,
}

/// Rules gathered for one prefix before flattening.
#[derive(Default)]
struct Gathered {
    any_port: u32,
    ranges: Vec<PortRange>,
}

impl PolicyTable {
    /// Compiles `spec`. A pod address listed twice keeps its first pod (control warns about
    /// shared addresses); a port range with `last < first` matches nothing.
    pub fn build(spec: &PolicySpec) -> PolicyTable {
        let mut t = PolicyTable {
            policies: spec.policies.clone(),
            ..PolicyTable::default()
        };
        for (i, pod) in spec.pods.iter().enumerate() {
            let index = i as u32;
            for ip in &pod.ips {
                t.pod_by_ip.entry(*ip).or_insert(index);
            }
            let ingress = pod.ingress.as_ref().map(|iso| t.compile(iso, index * 2));
            let egress = pod.egress.as_ref().map(|iso| t.compile(iso, index * 2 + 1));
            t.pods.push(Pod {
                name: pod.pod.clone(),
                ingress,
                egress,
            });
        }
        t
    }

    fn compile(&mut self, iso: &IsolationSpec, direction_id: u32) -> Isolation {
        // (is IPv6, prefix length, masked address) → what the rules allow there.
        let mut gathered: BTreeMap<(bool, u8, u128), Gathered> = BTreeMap::new();
        let any = [IpNet::V4(Default::default()), IpNet::V6(Default::default())];
        for rule in &iso.rules {
            for peer in rule.peers.as_deref().unwrap_or(&any) {
                let g = gathered.entry(key_of(peer)).or_insert_with(|| Gathered {
                    any_port: NONE,
                    ranges: Vec::new(),
                });
                add_rule(g, rule);
            }
        }
        let mut sets = [RuleSet::default(); 2];
        for (family, set) in sets.iter_mut().enumerate() {
            let v6 = family == 1;
            set.id = direction_id;
            set.min_policy = NONE;
            let mut lengths: Vec<u8> = Vec::new();
            for (&(_, len, addr), g) in gathered.range((v6, 0, 0)..=(v6, u8::MAX, u128::MAX)) {
                let first_range = self.ranges.len() as u32;
                self.ranges.extend(flatten(&g.ranges, g.any_port));
                let entry = PeerEntry {
                    any_port: g.any_port,
                    first_range,
                    end_range: self.ranges.len() as u32,
                };
                let ranges_min = self.ranges[first_range as usize..]
                    .iter()
                    .map(|r| r.policy)
                    .min()
                    .unwrap_or(NONE);
                set.min_policy = set.min_policy.min(g.any_port).min(ranges_min);
                if v6 {
                    let key = PrefixKey {
                        set: set.id,
                        len,
                        addr,
                    };
                    self.prefixes_v6.insert(key, entry);
                } else {
                    let key = PrefixKey {
                        set: set.id,
                        len,
                        addr: addr as u32,
                    };
                    self.prefixes_v4.insert(key, entry);
                }
                if !lengths.contains(&len) {
                    lengths.push(len);
                }
            }
            lengths.sort_unstable_by(|a, b| b.cmp(a));
            set.first_len = self.lengths.len() as u32;
            self.lengths.extend(lengths);
            set.end_len = self.lengths.len() as u32;
        }
        let mut policies = iso.policies.clone();
        policies.sort_unstable();
        policies.dedup();
        Isolation {
            policies,
            v4: sets[0],
            v6: sets[1],
        }
    }

    /// The verdict for a new connection into the pod at `pod_ip` from `peer`, to the pod's
    /// `port`.
    #[inline]
    pub fn ingress(&self, pod_ip: IpAddr, peer: IpAddr, protocol: Protocol, port: u16) -> Verdict {
        self.verdict(PolicyType::Ingress, pod_ip, peer, Some((protocol, port)))
    }

    /// The verdict for a new connection from the pod at `pod_ip` to `peer`:`port`, the
    /// destination after Service translation.
    #[inline]
    pub fn egress(&self, pod_ip: IpAddr, peer: IpAddr, protocol: Protocol, port: u16) -> Verdict {
        self.verdict(PolicyType::Egress, pod_ip, peer, Some((protocol, port)))
    }

    /// The verdict for a new connection in direction `ty`. `l4` is the protocol and port
    /// (the pod's own port for ingress, the destination's for egress); `None` for a
    /// protocol NetworkPolicy cannot name (ICMP and others), which only rules without
    /// `ports` allow.
    #[inline]
    pub fn verdict(
        &self,
        ty: PolicyType,
        pod_ip: IpAddr,
        peer: IpAddr,
        l4: Option<(Protocol, u16)>,
    ) -> Verdict {
        let Some(iso) = self.isolation(ty, pod_ip) else {
            return Verdict::NotIsolated;
        };
        let best = match peer {
            IpAddr::V4(a) => self.best(&self.prefixes_v4, &iso.v4, u32::from(a), l4),
            IpAddr::V6(a) => self.best(&self.prefixes_v6, &iso.v6, u128::from(a), l4),
        };
        if best == NONE {
            Verdict::Denied
        } else {
            Verdict::Allowed { policy: best }
        }
    }

    /// The lowest policy of `set` allowing `addr` and `l4`, or [`NONE`]: every prefix
    /// length of the set probed, every hit's port table searched.
    #[inline]
    fn best<A: Bits>(
        &self,
        map: &PrefixMap<A>,
        set: &RuleSet,
        addr: A,
        l4: Option<(Protocol, u16)>,
    ) -> u32 {
        let lengths = self
            .lengths
            .get(set.first_len as usize..set.end_len as usize)
            .unwrap_or(&[]);
        let mut best = NONE;
        for &len in lengths {
            let key = PrefixKey {
                set: set.id,
                len,
                addr: addr.mask(len),
            };
            let Some(entry) = map.get(&key) else {
                continue;
            };
            best = best.min(entry.any_port);
            if let Some((protocol, port)) = l4 {
                best = best.min(self.search(entry, protocol, port));
            }
            if best <= set.min_policy {
                break;
            }
        }
        best
    }

    #[inline]
    fn isolation(&self, ty: PolicyType, pod_ip: IpAddr) -> Option<&Isolation> {
        let pod = self.pods.get(*self.pod_by_ip.get(&pod_ip)? as usize)?;
        match ty {
            PolicyType::Ingress => pod.ingress.as_ref(),
            PolicyType::Egress => pod.egress.as_ref(),
        }
    }

    /// The lowest policy of `entry`'s port table allowing `port`, or [`NONE`].
    #[inline]
    fn search(&self, entry: &PeerEntry, protocol: Protocol, port: u16) -> u32 {
        let ranges = self
            .ranges
            .get(entry.first_range as usize..entry.end_range as usize)
            .unwrap_or(&[]);
        let after = ranges.partition_point(|r| (r.protocol, r.first) <= (protocol, port));
        match after.checked_sub(1).and_then(|i| ranges.get(i)) {
            Some(r) if r.protocol == protocol && port <= r.last => r.policy,
            _ => NONE,
        }
    }

    /// Which policies select the pod at `pod_ip` for `ty`, and the verdict for the
    /// connection (as [`PolicyTable::verdict`]); for inspection, not the packet path.
    pub fn explain(
        &self,
        ty: PolicyType,
        pod_ip: IpAddr,
        peer: IpAddr,
        l4: Option<(Protocol, u16)>,
    ) -> Explanation<'_> {
        let pod = self
            .pod_by_ip
            .get(&pod_ip)
            .and_then(|&i| self.pods.get(i as usize))
            .map(|p| p.name.as_str());
        Explanation {
            pod,
            policies: self
                .isolation(ty, pod_ip)
                .map_or(&[][..], |iso| &iso.policies),
            verdict: self.verdict(ty, pod_ip, peer, l4),
        }
    }

    /// The `namespace/name` of policy `index`; empty for an index the spec does not have.
    pub fn policy_name(&self, index: u32) -> &str {
        self.policies.get(index as usize).map_or("", String::as_str)
    }

    /// The `namespace/name` of every policy, by index.
    pub fn policies(&self) -> &[String] {
        &self.policies
    }

    /// The index of the pod holding `ip` (for per-pod counters), if it is isolated at all.
    #[inline]
    pub fn pod_index(&self, ip: IpAddr) -> Option<u32> {
        self.pod_by_ip.get(&ip).copied()
    }

    /// The `namespace/name` of pod `index`; empty for an index the table does not have.
    pub fn pod_name(&self, index: u32) -> &str {
        self.pods
            .get(index as usize)
            .map_or("", |p| p.name.as_str())
    }

    /// How many pods are isolated in some direction.
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// The policies isolating pod `index` for `ty`, ascending (empty when none does).
    pub fn isolating(&self, ty: PolicyType, index: u32) -> &[u32] {
        let iso = self.pods.get(index as usize).and_then(|p| match ty {
            PolicyType::Ingress => p.ingress.as_ref(),
            PolicyType::Egress => p.egress.as_ref(),
        });
        iso.map_or(&[][..], |i| &i.policies)
    }

    /// Whether no pod is isolated in any direction, so every verdict is
    /// [`Verdict::NotIsolated`] and the dataplane may skip asking.
    pub fn is_empty(&self) -> bool {
        self.pods
            .iter()
            .all(|p| p.ingress.is_none() && p.egress.is_none())
    }
}

fn key_of(net: &IpNet) -> (bool, u8, u128) {
    match net.trunc() {
        IpNet::V4(n) => (false, n.prefix_len(), u32::from(n.network()) as u128),
        IpNet::V6(n) => (true, n.prefix_len(), u128::from(n.network())),
    }
}

fn add_rule(g: &mut Gathered, rule: &RuleSpec) {
    match &rule.ports {
        None => g.any_port = g.any_port.min(rule.policy),
        Some(ports) => {
            g.ranges.extend(
                ports
                    .iter()
                    .filter(|p| p.first <= p.last)
                    .map(|p| PortRange {
                        protocol: p.protocol,
                        first: p.first,
                        last: p.last,
                        policy: rule.policy,
                    }),
            )
        }
    }
}

/// The union of possibly overlapping `ranges` as disjoint ranges sorted by (protocol,
/// first), each with the lowest policy covering it. Ranges of a policy no lower than
/// `any_port` are dropped: the port-less rule already answers better for every port.
fn flatten(ranges: &[PortRange], any_port: u32) -> Vec<PortRange> {
    // Sweep each protocol's boundaries, keeping the multiset of open ranges' policies.
    let mut events: Vec<(Protocol, u32, bool, u32)> = Vec::new();
    for r in ranges.iter().filter(|r| r.policy < any_port) {
        events.push((r.protocol, r.first as u32, true, r.policy));
        events.push((r.protocol, r.last as u32 + 1, false, r.policy));
    }
    events.sort_unstable();
    let mut out: Vec<PortRange> = Vec::new();
    let mut open: BTreeMap<u32, u32> = BTreeMap::new();
    let mut i = 0;
    while i < events.len() {
        let (protocol, at, _, _) = events[i];
        while i < events.len() && (events[i].0, events[i].1) == (protocol, at) {
            let (_, _, starts, policy) = events[i];
            if starts {
                *open.entry(policy).or_default() += 1;
            } else if let Some(n) = open.get_mut(&policy) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&policy);
                }
            }
            i += 1;
        }
        let Some(&policy) = open.keys().next() else {
            continue;
        };
        // Open ranges always close within the same protocol, so the next event is.
        let Some(&(_, next, _, _)) = events.get(i) else {
            continue;
        };
        let (first, last) = (at as u16, (next - 1) as u16);
        match out.last_mut() {
            Some(prev)
                if prev.protocol == protocol
                    && prev.policy == policy
                    && prev.last as u32 + 1 == at =>
            {
                prev.last = last;
            }
            _ => out.push(PortRange {
                protocol,
                first,
                last,
                policy,
            }),
        }
    }
    out
}

/// `net` minus every prefix of `except`, as the fewest prefixes that cover exactly what is
/// left, sorted (an `ipBlock`'s `cidr` minus its `except` list). Host bits are ignored;
/// excepts of the other family or outside `net` remove nothing.
pub fn subtract(net: IpNet, except: &[IpNet]) -> Vec<IpNet> {
    let except: Vec<IpNet> = except.iter().map(IpNet::trunc).collect();
    let mut out = Vec::new();
    let mut work = vec![net.trunc()];
    while let Some(n) = work.pop() {
        if except.iter().any(|e| e.contains(&n)) {
            continue;
        }
        if except.iter().any(|e| n.contains(e)) {
            // Some except lies strictly inside: keep the halves apart.
            match n.subnets(n.prefix_len() + 1) {
                Ok(halves) => work.extend(halves),
                Err(_) => out.push(n),
            }
            continue;
        }
        out.push(n);
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{PodPolicySpec, PortRangeSpec};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| net(s)).collect()
    }

    fn ports(list: &[(Protocol, u16, u16)]) -> Option<Vec<PortRangeSpec>> {
        Some(
            list.iter()
                .map(|&(protocol, first, last)| PortRangeSpec {
                    protocol,
                    first,
                    last,
                })
                .collect(),
        )
    }

    fn rule(policy: u32, peers: Option<&[&str]>, ports: Option<Vec<PortRangeSpec>>) -> RuleSpec {
        RuleSpec {
            policy,
            peers: peers.map(nets),
            ports,
        }
    }

    /// A table with one pod (10.244.1.10 and fd00:10:244:1::a) isolated for ingress by
    /// `rules` (policies 0..8 select it), not for egress.
    fn ingress_table(rules: Vec<RuleSpec>) -> PolicyTable {
        PolicyTable::build(&PolicySpec {
            policies: (0..8).map(|i| format!("x/p{i}")).collect(),
            pods: vec![PodPolicySpec {
                pod: "x/a".into(),
                ips: vec![ip("10.244.1.10"), ip("fd00:10:244:1::a")],
                ingress: Some(IsolationSpec {
                    policies: (0..8).collect(),
                    rules,
                }),
                egress: None,
            }],
        })
    }

    const POD: &str = "10.244.1.10";
    const POD6: &str = "fd00:10:244:1::a";
    use Protocol::{Sctp, Tcp, Udp};

    #[test]
    fn subtract_leaves_the_fewest_prefixes() {
        assert_eq!(
            subtract(net("10.244.1.0/24"), &nets(&["10.244.1.20/31"])),
            nets(&[
                "10.244.1.0/28",
                "10.244.1.16/30",
                "10.244.1.22/31",
                "10.244.1.24/29",
                "10.244.1.32/27",
                "10.244.1.64/26",
                "10.244.1.128/25",
            ])
        );
        // Two excepts, one of them inside the other; host bits ignored.
        assert_eq!(
            subtract(net("10.0.0.7/29"), &nets(&["10.0.0.0/30", "10.0.0.1/32"])),
            nets(&["10.0.0.4/30"])
        );
        assert_eq!(
            subtract(net("fd00::/64"), &nets(&["fd00::/65"])),
            nets(&["fd00::8000:0:0:0/65"])
        );
        assert_eq!(
            subtract(net("fd00::/126"), &nets(&["fd00::2/128"])),
            nets(&["fd00::/127", "fd00::3/128"])
        );
        // Nothing left, nothing removed (disjoint, other family), and no excepts.
        assert!(subtract(net("10.1.0.0/16"), &nets(&["10.0.0.0/8"])).is_empty());
        assert_eq!(
            subtract(net("10.1.0.0/16"), &nets(&["10.2.0.0/16", "::/0"])),
            nets(&["10.1.0.0/16"])
        );
        assert_eq!(subtract(net("0.0.0.0/0"), &[]), nets(&["0.0.0.0/0"]));
        assert_eq!(
            subtract(net("0.0.0.0/0"), &nets(&["128.0.0.0/1"])),
            nets(&["0.0.0.0/1"])
        );
    }

    #[test]
    fn every_matching_prefix_counts_not_only_the_longest() {
        let t = ingress_table(vec![
            rule(3, Some(&["10.0.0.0/8"]), ports(&[(Tcp, 80, 80)])),
            rule(1, Some(&["10.1.0.0/16"]), ports(&[(Tcp, 443, 443)])),
            rule(0, Some(&["10.1.2.3/32"]), ports(&[(Udp, 53, 53)])),
        ]);
        let peer = ip("10.1.2.3");
        let at = |proto, port| t.ingress(ip(POD), peer, proto, port);
        assert_eq!(at(Tcp, 80), Verdict::Allowed { policy: 3 });
        assert_eq!(at(Tcp, 443), Verdict::Allowed { policy: 1 });
        assert_eq!(at(Udp, 53), Verdict::Allowed { policy: 0 });
        assert_eq!(at(Tcp, 53), Verdict::Denied);
        assert_eq!(at(Tcp, 22), Verdict::Denied);
        // Only the /8 holds 10.9.9.9.
        assert_eq!(
            t.ingress(ip(POD), ip("10.9.9.9"), Tcp, 443),
            Verdict::Denied
        );
        assert_eq!(
            t.ingress(ip(POD), ip("10.9.9.9"), Tcp, 80),
            Verdict::Allowed { policy: 3 }
        );
        assert_eq!(t.ingress(ip(POD), ip("11.0.0.1"), Tcp, 80), Verdict::Denied);
    }

    #[test]
    fn overlapping_port_ranges_answer_the_lowest_policy_ends_included() {
        let t = ingress_table(vec![
            rule(5, None, ports(&[(Tcp, 1000, 2000)])),
            rule(2, None, ports(&[(Tcp, 1500, 1600), (Udp, 1000, 1000)])),
            rule(6, None, ports(&[(Tcp, 1600, 3000), (Sctp, 0, 65535)])),
            // Empty range: matches nothing.
            rule(0, None, ports(&[(Tcp, 9, 8)])),
        ]);
        let peer = ip("203.0.113.2");
        let at = |proto, port| t.ingress(ip(POD), peer, proto, port);
        let allowed = |policy| Verdict::Allowed { policy };
        assert_eq!(at(Tcp, 999), Verdict::Denied);
        assert_eq!(at(Tcp, 1000), allowed(5));
        assert_eq!(at(Tcp, 1499), allowed(5));
        assert_eq!(at(Tcp, 1500), allowed(2));
        assert_eq!(at(Tcp, 1600), allowed(2));
        assert_eq!(at(Tcp, 1601), allowed(5));
        assert_eq!(at(Tcp, 2000), allowed(5));
        assert_eq!(at(Tcp, 2001), allowed(6));
        assert_eq!(at(Tcp, 3000), allowed(6));
        assert_eq!(at(Tcp, 3001), Verdict::Denied);
        assert_eq!(at(Tcp, 8), Verdict::Denied);
        assert_eq!(at(Tcp, 9), Verdict::Denied);
        assert_eq!(at(Udp, 1000), allowed(2));
        assert_eq!(at(Udp, 1001), Verdict::Denied);
        assert_eq!(at(Sctp, 0), allowed(6));
        assert_eq!(at(Sctp, 65535), allowed(6));
        // A protocol without ports is only allowed by rules without ports.
        assert_eq!(
            t.verdict(PolicyType::Ingress, ip(POD), peer, None),
            Verdict::Denied
        );
    }

    #[test]
    fn flatten_merges_and_splits() {
        let r = |protocol, first, last, policy| PortRange {
            protocol,
            first,
            last,
            policy,
        };
        assert_eq!(
            flatten(
                &[
                    r(Tcp, 10, 20, 4),
                    r(Tcp, 21, 30, 4),
                    r(Tcp, 15, 25, 1),
                    r(Udp, 0, 65535, 2),
                    r(Tcp, 100, 200, 7),
                ],
                7
            ),
            [
                r(Tcp, 10, 14, 4),
                r(Tcp, 15, 25, 1),
                r(Tcp, 26, 30, 4),
                r(Udp, 0, 65535, 2)
            ]
        );
    }

    #[test]
    fn rules_without_ports_allow_every_protocol() {
        let t = ingress_table(vec![
            rule(4, Some(&["10.244.2.0/24"]), None),
            rule(1, Some(&["10.244.2.0/24"]), ports(&[(Tcp, 80, 80)])),
            rule(6, Some(&["10.244.2.5/32"]), ports(&[(Tcp, 81, 81)])),
        ]);
        let peer = ip("10.244.2.5");
        assert_eq!(
            t.ingress(ip(POD), peer, Tcp, 80),
            Verdict::Allowed { policy: 1 }
        );
        assert_eq!(
            t.ingress(ip(POD), peer, Tcp, 81),
            Verdict::Allowed { policy: 4 }
        );
        assert_eq!(
            t.ingress(ip(POD), peer, Udp, 9),
            Verdict::Allowed { policy: 4 }
        );
        assert_eq!(
            t.verdict(PolicyType::Ingress, ip(POD), peer, None),
            Verdict::Allowed { policy: 4 }
        );
        assert_eq!(
            t.ingress(ip(POD), ip("10.244.3.5"), Udp, 9),
            Verdict::Denied
        );
    }

    #[test]
    fn ipv6_is_its_own_family() {
        let t = ingress_table(vec![
            rule(2, Some(&["fd00:10:244::/48"]), ports(&[(Tcp, 80, 80)])),
            rule(3, Some(&["::1/128"]), None),
            rule(4, Some(&["10.0.0.0/8"]), None),
        ]);
        assert_eq!(
            t.ingress(ip(POD6), ip("fd00:10:244:2::5"), Tcp, 80),
            Verdict::Allowed { policy: 2 }
        );
        // The pod's IPv4 address names the same pod.
        assert_eq!(
            t.ingress(ip(POD), ip("fd00:10:244:2::5"), Tcp, 80),
            Verdict::Allowed { policy: 2 }
        );
        assert_eq!(
            t.ingress(ip(POD6), ip("fd00:10:245::5"), Tcp, 80),
            Verdict::Denied
        );
        // 0.0.0.1 and ::1 share their low bits but not their family.
        assert_eq!(t.ingress(ip(POD), ip("0.0.0.1"), Tcp, 80), Verdict::Denied);
        assert_eq!(
            t.ingress(ip(POD), ip("::1"), Tcp, 80),
            Verdict::Allowed { policy: 3 }
        );
        // 10.0.0.0/8 as an IPv6 prefix would be ::a00:0/104; it must not match there.
        assert_eq!(t.ingress(ip(POD6), ip("::a00:1"), Tcp, 80), Verdict::Denied);
        assert_eq!(
            t.ingress(ip(POD6), ip("10.0.0.1"), Tcp, 80),
            Verdict::Allowed { policy: 4 }
        );
    }

    #[test]
    fn not_isolated_differs_from_isolated_without_rules() {
        let t = PolicyTable::build(&PolicySpec {
            policies: vec!["x/deny-all".into(), "x/egress".into()],
            pods: vec![
                PodPolicySpec {
                    pod: "x/a".into(),
                    ips: vec![ip(POD)],
                    ingress: Some(IsolationSpec {
                        policies: vec![0],
                        rules: vec![],
                    }),
                    egress: None,
                },
                PodPolicySpec {
                    pod: "x/b".into(),
                    ips: vec![ip("10.244.1.11")],
                    ingress: None,
                    egress: Some(IsolationSpec {
                        policies: vec![1, 0],
                        rules: vec![rule(1, None, None)],
                    }),
                },
            ],
        });
        let peer = ip("10.244.1.99");
        assert!(!t.is_empty());
        assert_eq!(t.ingress(ip(POD), peer, Tcp, 80), Verdict::Denied);
        assert_eq!(t.egress(ip(POD), peer, Tcp, 80), Verdict::NotIsolated);
        assert_eq!(
            t.ingress(ip("10.244.1.11"), peer, Tcp, 80),
            Verdict::NotIsolated
        );
        assert_eq!(
            t.egress(ip("10.244.1.11"), ip("2001:db8::1"), Udp, 53),
            Verdict::Allowed { policy: 1 }
        );
        // An address no isolated pod has.
        assert_eq!(
            t.ingress(ip("10.244.1.12"), peer, Tcp, 80),
            Verdict::NotIsolated
        );

        let e = t.explain(PolicyType::Ingress, ip(POD), peer, Some((Tcp, 80)));
        assert_eq!(e.pod, Some("x/a"));
        assert_eq!(e.policies, &[0]);
        assert_eq!(e.verdict, Verdict::Denied);
        let e = t.explain(PolicyType::Egress, ip("10.244.1.11"), peer, Some((Tcp, 80)));
        assert_eq!(e.policies, &[0, 1]);
        assert_eq!(e.verdict, Verdict::Allowed { policy: 1 });
        assert_eq!(t.policy_name(1), "x/egress");
        assert_eq!(t.policy_name(7), "");
        let e = t.explain(PolicyType::Egress, ip(POD), peer, None);
        assert_eq!(
            (e.pod, e.policies, e.verdict),
            (Some("x/a"), &[][..], Verdict::NotIsolated)
        );

        assert!(PolicyTable::build(&PolicySpec::default()).is_empty());
    }

    #[test]
    fn one_prefix_in_many_rules_and_pods_stays_apart() {
        // Pod b's rule must not leak into pod a, nor egress into ingress.
        let iso = |policy, peer: &str| {
            Some(IsolationSpec {
                policies: vec![policy],
                rules: vec![rule(policy, Some(&[peer]), None)],
            })
        };
        let t = PolicyTable::build(&PolicySpec {
            policies: vec!["x/p0".into(), "x/p1".into()],
            pods: vec![
                PodPolicySpec {
                    pod: "x/a".into(),
                    ips: vec![ip(POD)],
                    ingress: iso(0, "10.0.0.1/32"),
                    egress: iso(0, "10.0.0.2/32"),
                },
                PodPolicySpec {
                    pod: "x/b".into(),
                    ips: vec![ip("10.244.1.11")],
                    ingress: iso(1, "10.0.0.3/32"),
                    egress: None,
                },
            ],
        });
        let v = |ty, pod: &str, peer: &str| t.verdict(ty, ip(pod), ip(peer), Some((Tcp, 1)));
        use PolicyType::{Egress, Ingress};
        assert_eq!(v(Ingress, POD, "10.0.0.1"), Verdict::Allowed { policy: 0 });
        assert_eq!(v(Ingress, POD, "10.0.0.2"), Verdict::Denied);
        assert_eq!(v(Ingress, POD, "10.0.0.3"), Verdict::Denied);
        assert_eq!(v(Egress, POD, "10.0.0.2"), Verdict::Allowed { policy: 0 });
        assert_eq!(v(Egress, POD, "10.0.0.1"), Verdict::Denied);
        assert_eq!(
            v(Ingress, "10.244.1.11", "10.0.0.3"),
            Verdict::Allowed { policy: 1 }
        );
        assert_eq!(v(Ingress, "10.244.1.11", "10.0.0.1"), Verdict::Denied);
    }

    #[test]
    fn mask_keeps_the_prefix_bits() {
        assert_eq!(0x0a01_0203u32.mask(8), 0x0a00_0000);
        assert_eq!(0x0a01_0203u32.mask(32), 0x0a01_0203);
        assert_eq!(0x0a01_0203u32.mask(0), 0);
        assert_eq!(u128::MAX.mask(0), 0);
        assert_eq!(u128::MAX.mask(128), u128::MAX);
        assert_eq!(u128::MAX.mask(1), 1 << 127);
    }
}
