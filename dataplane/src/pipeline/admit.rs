//! A new connection's admission: Service translation (frontend, endpoint choice,
//! masquerade), a pod's masquerade out of the cluster, NetworkPolicy, and its entry in the
//! connection table, where a full table or masquerade range has an unassured connection
//! yield first.

use std::net::IpAddr;

use nat::conntrack::{Connection, Direction, FlowKey, Hit, InsertError};
use nat::packet::{self, End, Headers};
use nat::policy::{PolicyType, Verdict};
use nat::tables::{Decision, FrontendKey};
use nat::timeouts::{self, State};

use super::{tuple_of, Outcome, Pipeline, Rx};
use crate::counters::DropReason;
use crate::monitor::EventKind;

/// First port of the masquerade source-port range (the kernel's default ephemeral range).
pub const SNAT_PORT_MIN: u16 = 32768;
/// Last port of the masquerade source-port range.
pub const SNAT_PORT_MAX: u16 = 60999;
/// Ports tried before a masqueraded connection is refused; bounded so a crowded range
/// costs a new flow at most this many conntrack probes.
const SNAT_TRIES: u64 = 64;
/// Masquerade ports looked up together once the first tried is taken.
const SNAT_LOOKAHEAD: usize = 8;

/// A new connection's NetworkPolicy admission.
#[derive(Clone, Copy, Debug, Default)]
struct Admitted {
    /// Whether a policy isolated either end (the verdict must then be kept in conntrack).
    isolated: bool,
    /// [`Connection::policy`]: 1 + the allowing policy, 0 when none isolated.
    tag: u32,
}

/// A connection about to be tracked.
struct NewConn {
    /// Its tuple as the first packet arrived.
    key: FlowKey,
    /// Its reply tuple; with `snat`, the destination end is chosen at insertion.
    reply: FlowKey,
    /// The masquerade address, if the connection is masqueraded.
    snat: Option<IpAddr>,
    /// Masquerade ports to choose from (inclusive).
    ports: (u16, u16),
    /// The Service's id (0: none).
    service: u32,
    /// Its first state.
    state: State,
    /// Its policy tag ([`Admitted::tag`]).
    policy: u32,
}

impl Pipeline<'_> {
    /// A new connection to a Service frontend: the endpoint chosen (Maglev, affinity,
    /// traffic policies), masquerade where kube-proxy masquerades, policy judged on the
    /// translated packet, tracked and translated. `None` when the destination is no
    /// frontend.
    pub(super) fn to_service(
        &self,
        rx: &mut Rx<'_>,
        h: &mut Headers,
        key: FlowKey,
        flags: u8,
    ) -> Option<Outcome> {
        let proto = nat::spec::Protocol::from_number(h.proto)?;
        let fkey = FrontendKey {
            ip: h.dst,
            port: h.dport,
            protocol: proto,
        };
        let f = self.tables.services.frontend(&fkey)?;
        let decision = self.tables.services.decide_with_affinity(
            f,
            h.src,
            self.flow_hash(&key),
            Some(&self.shared.affinity),
            self.now,
        );
        let (backend, masquerade) = match decision {
            Decision::Translate {
                backend,
                masquerade,
            } => (backend, masquerade),
            Decision::Reject => return Some(self.reject(rx, h)),
            Decision::Drop => return Some(Outcome::Drop(DropReason::NoLocalEndpoint)),
            Decision::SourceFiltered => return Some(Outcome::Drop(DropReason::SourceRange)),
        };
        let reply = FlowKey {
            proto: h.proto,
            src: backend.ip,
            dst: h.src,
            sport: backend.port,
            dport: h.sport,
        };
        // Masquerade takes the address of the way out, as the kernel's does: the node's own
        // towards an endpoint outside the pod networks, with the ports whose replies the
        // uplink hands us.
        let (snat, ports) = if masquerade {
            let outside = !self.tables.in_cluster_network(backend.ip)
                && !self.tables.node_addresses.contains(&backend.ip);
            let (source, ports) = if outside {
                let ports = self.shared.limits.egress_masquerade_ports;
                (self.tables.egress_source(h.v6), ports)
            } else {
                let ports = (SNAT_PORT_MIN, SNAT_PORT_MAX);
                (self.tables.masquerade_source(h.v6), ports)
            };
            match source {
                Some(ip) => (Some(ip), ports),
                None => return Some(Outcome::Drop(DropReason::NoRoute)),
            }
        } else {
            (None, (SNAT_PORT_MIN, SNAT_PORT_MAX))
        };
        let peer = snat.unwrap_or(h.src);
        let policy = match self.judge(h.proto, h.src, backend.ip, backend.port, peer) {
            Ok(policy) => policy,
            Err(reason) => return Some(Outcome::Drop(reason)),
        };
        let new = NewConn {
            key,
            reply,
            snat,
            ports,
            service: f.service,
            state: timeouts::initial(h.proto, flags),
            policy: policy.tag,
        };
        let conn = match self.track(rx, new) {
            Ok(conn) => conn,
            Err(reason) => return Some(Outcome::Drop(reason)),
        };
        if self.shared.monitor.active() {
            let to = Some((conn.reply.src, conn.reply.sport));
            let masq = snat.map(|ip| (ip, conn.reply.dport));
            self.event(EventKind::Translated, h, to, masq, conn.policy, None);
        }
        translate(rx.pkt(), h, &conn, Direction::Original);
        rx.c.nat_new += 1;
        Some(self.route(rx, h, true))
    }

    /// A pod reaching outside the cluster's pod networks: masqueraded to the node's address
    /// (flannel's ipMasq), from a port range the node's own connections do not use, so
    /// replies come back to us and never collide with the host's. `None` when the node has
    /// no address of the packet's family to leave with.
    pub(super) fn masquerade_out(&self, rx: &mut Rx<'_>, h: &mut Headers) -> Option<Outcome> {
        let node_ip = self.tables.egress_source(h.v6)?;
        let policy = match self.judge(h.proto, h.src, h.dst, h.dport, h.src) {
            Ok(policy) => policy,
            Err(reason) => return Some(Outcome::Drop(reason)),
        };
        let (key, flags) = tuple_of(rx.pkt(), h);
        let new = NewConn {
            key,
            reply: key.reversed(),
            snat: Some(node_ip),
            ports: self.shared.limits.egress_masquerade_ports,
            service: 0,
            state: timeouts::initial(h.proto, flags),
            policy: policy.tag,
        };
        let conn = match self.track(rx, new) {
            Ok(conn) => conn,
            Err(reason) => return Some(Outcome::Drop(reason)),
        };
        if self.shared.monitor.active() {
            let masq = Some((conn.reply.dst, conn.reply.dport));
            self.event(EventKind::Masqueraded, h, None, masq, conn.policy, None);
        }
        translate(rx.pkt(), h, &conn, Direction::Original);
        rx.c.masqueraded_out += 1;
        Some(self.route(rx, h, true))
    }

    /// Tracks a new untranslated connection of a local pod (an identity entry) with its
    /// NetworkPolicy verdict. A refusal by policy is returned; so is a full table for a pod
    /// some policy isolates, while a connection no policy isolates goes on untracked.
    pub(super) fn track_untranslated(
        &self,
        rx: &mut Rx<'_>,
        h: &Headers,
    ) -> Result<(), DropReason> {
        let policy = self.judge(h.proto, h.src, h.dst, h.dport, h.src)?;
        let (key, flags) = tuple_of(rx.pkt(), h);
        let new = NewConn {
            key,
            reply: key.reversed(),
            snat: None,
            ports: (SNAT_PORT_MIN, SNAT_PORT_MAX),
            service: 0,
            state: timeouts::initial(h.proto, flags),
            policy: policy.tag,
        };
        match self.track(rx, new) {
            Ok(_) => {
                rx.c.tracked_new += 1;
                if self.shared.monitor.active() {
                    self.event(EventKind::Tracked, h, None, None, policy.tag, None);
                }
                Ok(())
            }
            Err(_) if !policy.isolated => {
                rx.c.untracked += 1;
                Ok(())
            }
            Err(reason) => Err(reason),
        }
    }

    /// NetworkPolicy for a new connection from `src` to `dst`:`dport` (after Service
    /// translation): the source pod's egress towards `dst`, and the destination pod's
    /// ingress from `peer` (the source as the pod will see it, after masquerade). Traffic
    /// from the node itself (its addresses, the pods' gateway, which masquerade uses) is
    /// always allowed into a pod. A refusal is counted on the pod and its policies.
    fn judge(
        &self,
        proto: u8,
        src: IpAddr,
        dst: IpAddr,
        dport: u16,
        peer: IpAddr,
    ) -> Result<Admitted, DropReason> {
        let mut out = Admitted::default();
        if !self.tables.policy_active {
            return Ok(out);
        }
        let table = &self.tables.policy;
        // ICMP and other protocols have no port: only rules without ports allow them.
        let l4 = nat::spec::Protocol::from_number(proto).map(|p| (p, dport));
        match table.verdict(PolicyType::Egress, src, dst, l4) {
            Verdict::Denied => {
                self.tables
                    .policy_drops
                    .count(table, PolicyType::Egress, src);
                return Err(DropReason::PolicyDenied);
            }
            Verdict::Allowed { policy } => {
                out.isolated = true;
                out.tag = policy.saturating_add(1);
            }
            Verdict::NotIsolated => {}
        }
        let from_node = self.tables.is_gateway(peer) || self.tables.node_addresses.contains(&peer);
        if from_node {
            return Ok(out);
        }
        match table.verdict(PolicyType::Ingress, dst, peer, l4) {
            Verdict::Denied => {
                self.tables
                    .policy_drops
                    .count(table, PolicyType::Ingress, dst);
                Err(DropReason::PolicyDenied)
            }
            Verdict::Allowed { policy } => {
                out.isolated = true;
                out.tag = policy.saturating_add(1);
                Ok(out)
            }
            Verdict::NotIsolated => Ok(out),
        }
    }

    /// Inserts a new connection, choosing a masquerade port from `new.ports` that no live
    /// flow uses. The client's own port is kept when it is in the range and free, else
    /// ports are drawn at random ([`nth_port`]); an ICMP echo's identifier is both its
    /// "ports". When room runs out, a connection that is not assured
    /// yields its place (see `nat::timeouts`): near the new tuples in a full table, or, when
    /// every port tried is taken, the one seen earliest among those holding them.
    fn track(&self, rx: &mut Rx<'_>, new: NewConn) -> Result<Connection, DropReason> {
        let NewConn {
            key,
            mut reply,
            mut snat,
            ports,
            service,
            state,
            policy,
        } = new;
        // Whatever follows may write the table: misses looked up before it no longer stand.
        self.writes.set(self.writes.get().wrapping_add(1));
        let c = &mut *rx.c;
        let timeout = timeouts::timeout(key.proto, state);
        let mut evicted = false;
        // The port of the unassured connection seen earliest among those holding a
        // masquerade port tried: (when last seen, its lookup, the port).
        let mut yielding: Option<(u64, Hit, u16)> = None;
        let (first, last) = (ports.0.min(ports.1), ports.0.max(ports.1));
        let span = (last - first) as u64 + 1;
        let seed = self.flow_hash(&key);
        let echo = matches!(key.proto, packet::PROTO_ICMP | packet::PROTO_ICMPV6);
        // Tracks the connection with reply tuple `reply`: it, and the entries evicted for it.
        let insert = |reply: FlowKey| {
            let conn = Connection {
                original: key,
                reply,
                service,
                policy,
            };
            self.shared
                .conntrack
                .insert_evicting_hashed(
                    conn,
                    seed,
                    state as u8,
                    self.now,
                    timeout,
                    timeouts::last_seen,
                )
                .map(|inserted| (conn, inserted.evicted))
        };
        // The lookups of the masquerade ports of the tries in `group`.
        let mut ahead = [None; SNAT_LOOKAHEAD];
        let mut group: Option<Group> = None;
        for i in 0..SNAT_TRIES {
            if let Some(ip) = snat {
                reply.dst = ip;
                reply.dport = if i == 0 && (first..=last).contains(&key.sport) {
                    key.sport
                } else {
                    nth_port(seed, i, first, span)
                };
                if echo {
                    reply.sport = reply.dport;
                }
            }
            // A port another connection holds costs a lookup to pass over, and the ports
            // after the first taken are looked up in growing groups, 1, 2, 4, then
            // `SNAT_LOOKAHEAD` at a time (their cache misses overlap: in a crowded range
            // each lookup would wait for memory on its own; in an empty one few are
            // wasted). Only a port found free is inserted (whose insert looks both tuples
            // up again, for a racer).
            let mut taken = match snat {
                Some(_) if i > 0 => {
                    let (g, new) = Group::holding(group, i);
                    group = Some(g);
                    if new {
                        let n = g.n as usize;
                        let mut keys = [reply; SNAT_LOOKAHEAD];
                        for (j, k) in keys[..n].iter_mut().enumerate() {
                            k.dport = nth_port(seed, i + j as u64, first, span);
                            if echo {
                                k.sport = k.dport;
                            }
                        }
                        self.shared
                            .conntrack
                            .get_bulk(&keys[..n], self.now, &mut ahead[..n]);
                    }
                    ahead[(i - g.from) as usize]
                }
                _ => None,
            };
            if taken.is_none() {
                match insert(reply) {
                    Ok((conn, dropped)) => {
                        c.conntrack_early_drop += dropped as u64;
                        return Ok(conn);
                    }
                    Err(InsertError::Full) => return Err(DropReason::ConntrackFull),
                    Err(InsertError::Exists) => {
                        // Another worker tracked this very connection first: use its choice.
                        if let Some(hit) = self.shared.conntrack.get_hashed(&key, seed, self.now) {
                            if hit.dir == Direction::Original {
                                return Ok(hit.conn);
                            }
                        }
                        taken = self.shared.conntrack.get(&reply, self.now);
                    }
                }
            }
            // Else the reply tuple is another connection's: the client reuses a source port
            // towards a backend it also reached directly, or another connection holds the
            // masquerade port. A closed TCP connection's entry gives way (as the kernel's
            // conntrack restarts a TIME_WAIT tuple on a new SYN); else the source port is
            // remapped, as the kernel's NAT does on a clash (the backend sees another port).
            if let Some(old) = taken.filter(|_| !evicted) {
                let closed = old.conn.original.proto == packet::PROTO_TCP
                    && matches!(State::from_u8(old.state), State::Closing | State::Reset);
                if closed && self.shared.conntrack.remove_hit(&old) {
                    evicted = true;
                    // Its tuple is free now: take it (a look ahead past it is stale).
                    group = None;
                    match insert(reply) {
                        Ok((conn, dropped)) => {
                            c.conntrack_early_drop += dropped as u64;
                            return Ok(conn);
                        }
                        Err(InsertError::Full) => return Err(DropReason::ConntrackFull),
                        // Taken again at once (a racer): on to the next port.
                        Err(InsertError::Exists) => continue,
                    }
                }
            }
            if let (Some(old), Some(_)) = (taken, snat) {
                if let Some(seen) = timeouts::last_seen(old.state, old.expires) {
                    if yielding.is_none_or(|(s, _, _)| seen < s) {
                        yielding = Some((seen, old, reply.dport));
                    }
                }
            }
            if snat.is_none() {
                if echo {
                    return Err(DropReason::TupleTaken);
                }
                snat = Some(key.src);
            }
        }
        // Every port tried is taken: the unassured connection seen earliest among their
        // holders gives its port up (a flood's SYN, never answered, ages while a real
        // client's completes its handshake within a round trip). Unless another worker
        // tracked this very connection while the ports were passed over.
        if let Some(hit) = self.shared.conntrack.get_hashed(&key, seed, self.now) {
            if hit.dir == Direction::Original {
                return Ok(hit.conn);
            }
        }
        if let Some((_, old, port)) = yielding {
            if self
                .shared
                .conntrack
                .evict(&old, self.now, timeouts::last_seen)
            {
                c.conntrack_early_drop += 1;
                reply.dport = port;
                if echo {
                    reply.sport = port;
                }
                if let Ok((conn, dropped)) = insert(reply) {
                    c.conntrack_early_drop += dropped as u64;
                    return Ok(conn);
                }
            }
        }
        Err(DropReason::SnatExhausted)
    }
}

/// Tries whose masquerade ports were looked up together: `n` from try `from`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Group {
    from: u64,
    n: u64,
}

impl Group {
    /// The group that holds try `i` (from 1) after `last`: `last` while it does, else a new
    /// one from `i` (then `true`: its ports are to be looked up). Groups grow 1, 2, 4, then
    /// `SNAT_LOOKAHEAD` tries, and end at `SNAT_TRIES`.
    fn holding(last: Option<Group>, i: u64) -> (Group, bool) {
        match last {
            Some(g) if (g.from..g.from + g.n).contains(&i) => (g, false),
            _ => {
                let n = i.min(SNAT_LOOKAHEAD as u64).min(SNAT_TRIES - i);
                (Group { from: i, n }, true)
            }
        }
    }
}

/// The `i`th masquerade port a connection whose flow hash is `seed` tries, from the `span`
/// ports from `first`: each try an independent draw. Ports taken along one progression
/// (`seed + i * step`, as the kernel's NAT walks them from a random offset) cluster, since
/// connections whose progressions meet walk the same ports from there on: the tries a new
/// flow needed grew as in linear probing, with the square of 1 / (the free share of the
/// range), not with it (`tests::masquerade_ports_do_not_cluster`).
fn nth_port(seed: u64, i: u64, first: u16, span: u64) -> u16 {
    let h = (seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    first + (((h >> 32) * span) >> 32) as u16
}

/// Applies a tracked connection's translation to a packet of it.
pub(super) fn translate(pkt: &mut [u8], h: &mut Headers, conn: &Connection, dir: Direction) {
    match dir {
        Direction::Original => {
            if conn.reply.src != h.dst || conn.reply.sport != h.dport {
                packet::rewrite(pkt, h, End::Destination, conn.reply.src, conn.reply.sport);
            }
            if conn.reply.dst != h.src || conn.reply.dport != h.sport {
                packet::rewrite(pkt, h, End::Source, conn.reply.dst, conn.reply.dport);
            }
        }
        Direction::Reply => {
            if conn.original.dst != h.src || conn.original.dport != h.sport {
                packet::rewrite(pkt, h, End::Source, conn.original.dst, conn.original.dport);
            }
            if conn.original.src != h.dst || conn.original.sport != h.dport {
                packet::rewrite(
                    pkt,
                    h,
                    End::Destination,
                    conn.original.src,
                    conn.original.sport,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills `SNAT_PORT_MIN..=SNAT_PORT_MAX` to 80% as `track` does (each connection takes
    /// the first free port it tries; the flow hashes are a PRNG's) and returns the mean
    /// tries of the connections that find the range 70-80% full, with `port` the `i`th
    /// try of a flow hashed `seed`.
    fn tries_when_crowded(port: impl Fn(u64, u64, u16, u64) -> u16) -> f64 {
        let first = SNAT_PORT_MIN;
        let span = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u64 + 1;
        let mut taken = vec![false; span as usize];
        let mut rng = 0x2026_1207_u64;
        let (mut tries, mut counted) = (0u64, 0u64);
        for n in 0..span * 8 / 10 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let seed = rng ^ (rng >> 29);
            let free = (0..4 * SNAT_TRIES)
                .find(|&i| !taken[(port(seed, i, first, span) - first) as usize])
                .expect("a free port within 256 tries at 80%");
            taken[(port(seed, free, first, span) - first) as usize] = true;
            if n >= span * 7 / 10 {
                tries += free + 1;
                counted += 1;
            }
        }
        tries as f64 / counted as f64
    }

    #[test]
    fn masquerade_lookups_grow_and_cover_every_try_once() {
        let (mut last, mut sizes) = (None, Vec::new());
        for i in 1..SNAT_TRIES {
            let (g, new) = Group::holding(last, i);
            assert!((g.from..g.from + g.n).contains(&i), "try {i} outside {g:?}");
            if new {
                assert_eq!(g.from, i, "a group starts where the last ended");
                sizes.push(g.n);
            }
            last = Some(g);
        }
        assert_eq!(sizes, [1, 2, 4, 8, 8, 8, 8, 8, 8, 8]);
        assert_eq!(sizes.iter().sum::<u64>(), SNAT_TRIES - 1);
    }

    #[test]
    fn masquerade_ports_stay_in_their_range() {
        for (first, last) in [(65535, 65535), (1, 65535), (61000, 65535), (32768, 60999)] {
            let span = (last - first) as u64 + 1;
            let mut seed = 0x2026_1207_u64;
            for i in 0..10_000 {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                let p = nth_port(seed, i % SNAT_TRIES, first, span);
                assert!((first..=last).contains(&p), "{p} outside {first}-{last}");
            }
        }
    }

    #[test]
    fn masquerade_ports_do_not_cluster() {
        // Independent draws: 1 / (free share), 3.3-5 tries from 70% to 80% full (~4).
        let drawn = tries_when_crowded(nth_port);
        assert!(drawn < 5.0, "{drawn:.1} tries per new flow at 70-80%");
        // One progression per flow (the ports before): clustered, about twice as many.
        let progression = |seed: u64, i: u64, first: u16, span: u64| {
            first + (seed.wrapping_add(i.wrapping_mul(0x9e37_79b9)) % span) as u16
        };
        let walked = tries_when_crowded(progression);
        assert!(walked > drawn * 1.5, "{walked:.1} vs {drawn:.1}");
    }
}
