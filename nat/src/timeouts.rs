//! Protocol state of tracked connections and the timeout each state gets.
//!
//! kube-proxy leaves these to the kernel's conntrack (tuning two of them); Cilium keeps its
//! own. The values here follow the kernel as kube-proxy configures it:
//!
//! | state | kxdp | kernel (kube-proxy) | Cilium |
//! |---|---|---|---|
//! | TCP SYN sent (unreplied) | 5 s | 120 s (`tcp_timeout_syn_sent`) | 60 s (`CT_SYN_TIMEOUT`) |
//! | TCP SYN received | 60 s | 60 s | 60 s |
//! | TCP established | 86400 s | 86400 s (`--conntrack-tcp-timeout-established`) | 21600 s |
//! | TCP picked up mid-stream, no reply yet | 300 s | 300 s (`tcp_timeout_unacknowledged`, the cap on an established entry without a reply) | 21600 s |
//! | TCP closing (FIN seen) | 120 s | 120 s `fin_wait` / 3600 s `close_wait` (`--conntrack-tcp-timeout-close-wait`) | 10 s (`CT_CLOSE_TIMEOUT`) |
//! | TCP reset | 10 s | 10 s (`tcp_timeout_close`) | 10 s |
//! | UDP, SCTP one-way | 30 s | 30 s (`udp_timeout`) | 60 s |
//! | UDP, SCTP both ways | 120 s | 120 s (`udp_timeout_stream`) | 60 s |
//! | ICMP echo | 30 s | 30 s | 60 s |
//!
//! **A connection that starts without a SYN** (an ACK, a FIN, a SYN-ACK: the dataplane
//! restarted without a handover, or routes changed under a stream) is still taken up, as
//! the kernel's default `nf_conntrack_tcp_loose` does, so that such a stream is not cut.
//! But nothing yet shows that anybody is at the other end, and a spoofed ACK or FIN costs
//! an attacker no more than a SYN: until a packet comes back it is [`State::PickedUp`],
//! not assured and capped at 300 s, as Linux caps an `ESTABLISHED` entry without
//! `IPS_SEEN_REPLY` at `nf_conntrack_tcp_timeout_unacknowledged` (and sets `IPS_ASSURED`
//! only on "a valid answer for a picked up connection"; `nf_conntrack_proto_tcp.c`,
//! `nf_conntrack_tcp_packet`). The first packet back (other than a RST, which resets it)
//! makes it established and assured. Before, it was established at once, for 24 h and
//! assured: a spoofed ACK flood at a NodePort held the masquerade ports for a day.
//! Connections handed over keep their state, so a handover needs no pickup; a successor
//! older than this state reads its byte (6) as `New`: the connection is forwarded all the
//! same, only not assured there.
//!
//! **Unreplied SYNs** get 5 s, not the kernel's 120 s: a spoofed SYN flood at a NodePort
//! holds a masquerade port per SYN for as long as this timeout (28,232 ports per backend),
//! and 120 s of them locked real clients out for about a minute (issue 16). A client's
//! retransmitted SYN refreshes its entry (Linux retransmits after 1, 2 and 4 s); a later
//! one finds it gone and is tracked anew, picking the same port when it is free (the first
//! port tried is the client's own, else one drawn from its tuple's hash), and nothing was
//! lost since nothing had answered. UDP one way keeps the kernel's 30 s: a request may be
//! answered late (DNS clients wait 5 s), and datagrams refresh their entry anyway.
//!
//! **When room runs out** (every masquerade port tried is taken, or the table or a tuple's
//! index windows are full) an entry whose connection is not [`State::assured`] yields its
//! place to the new one: the one seen earliest among those holding a port tried, or
//! indexed near the new tuples ([`last_seen`]), counted in `conntrack_early_drop`. This is
//! the kernel's `early_drop`, which evicts an entry without `IPS_ASSURED` from the new
//! tuple's hash buckets when the table is full, but also for ports: the kernel's NAT
//! refuses the flow when its port search fails. A flood's entries never complete a
//! handshake (nor, taken up mid-stream, see an answer), while a real client's are assured
//! one round trip after its SYN, and are the last seen of all until then, so a flood can no
//! longer lock real clients out.

use crate::conntrack::Direction;
use crate::packet::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP};

/// One second in the tables' clock unit (nanoseconds).
pub const SECOND: u64 = 1_000_000_000;

/// TCP flag bits.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// Protocol state stored with a connection (one byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Nothing seen yet / UDP or SCTP with traffic in one direction only.
    New = 0,
    /// TCP: the client's SYN.
    SynSent = 1,
    /// TCP: the server's SYN-ACK.
    SynRecv = 2,
    /// TCP: handshake done; UDP/SCTP: traffic both ways.
    Established = 3,
    /// TCP: a FIN was seen.
    Closing = 4,
    /// TCP: a RST was seen.
    Reset = 5,
    /// TCP: taken up without a SYN (mid-stream), nothing seen in the reply direction yet.
    PickedUp = 6,
}

impl State {
    /// The state stored as a byte.
    pub fn from_u8(v: u8) -> State {
        match v {
            1 => State::SynSent,
            2 => State::SynRecv,
            3 => State::Established,
            4 => State::Closing,
            5 => State::Reset,
            6 => State::PickedUp,
            _ => State::New,
        }
    }

    /// Whether a connection in this state keeps its place when room runs out (the kernel's
    /// `IPS_ASSURED`): a TCP handshake completed (or a stream taken up mid-way answered),
    /// or a datagram flow answered. Not assured, and so evicted first: a SYN not answered,
    /// a SYN-ACK not acknowledged, a stream taken up mid-way and not answered, a reset
    /// connection, a datagram flow one way.
    pub fn assured(self) -> bool {
        matches!(self, State::Established | State::Closing)
    }

    /// Its name, for inspection.
    pub fn name(self) -> &'static str {
        match self {
            State::New => "NEW",
            State::SynSent => "SYN_SENT",
            State::SynRecv => "SYN_RECV",
            State::Established => "ESTABLISHED",
            State::Closing => "CLOSING",
            State::Reset => "RESET",
            State::PickedUp => "PICKED_UP",
        }
    }
}

/// The state of a new connection from its first packet.
pub fn initial(proto: u8, tcp_flags: u8) -> State {
    if proto == PROTO_TCP {
        if tcp_flags & tcp_flags::RST != 0 {
            State::Reset
        } else if tcp_flags & tcp_flags::SYN != 0 && tcp_flags & tcp_flags::ACK == 0 {
            State::SynSent
        } else {
            State::PickedUp
        }
    } else {
        State::New
    }
}

/// The state after a packet of an existing connection.
pub fn next(proto: u8, state: State, dir: Direction, tcp_flags: u8) -> State {
    if proto != PROTO_TCP {
        return match (state, dir) {
            (State::New, Direction::Reply) => State::Established,
            (s, _) => s,
        };
    }
    use tcp_flags::*;
    if tcp_flags & RST != 0 {
        return State::Reset;
    }
    match (state, dir) {
        // Whatever it carries, the first packet back shows a peer: the kernel's "valid
        // answer for a picked up connection".
        (State::PickedUp, Direction::Reply) if tcp_flags & FIN == 0 => State::Established,
        // A FIN proves nothing on a connection nobody answered, or one reset: it keeps
        // such a connection unassured rather than closing (the kernel ignores a FIN in
        // SYN_SENT and CLOSE too), or spoofed pairs (SYN or RST or ACK, then FIN) would be
        // assured.
        (State::SynSent | State::Reset, _) | (State::PickedUp, Direction::Original)
            if tcp_flags & FIN != 0 =>
        {
            state
        }
        _ if tcp_flags & FIN != 0 => State::Closing,
        (State::SynSent, Direction::Reply) if tcp_flags & SYN != 0 && tcp_flags & ACK != 0 => {
            State::SynRecv
        }
        (State::SynRecv, Direction::Original) if tcp_flags & ACK != 0 && tcp_flags & SYN == 0 => {
            State::Established
        }
        // A new SYN on a reset or closed tuple reopens it (port reuse), as does one on a
        // tuple taken up mid-stream and never answered.
        (State::Reset | State::Closing | State::PickedUp, Direction::Original)
            if tcp_flags & SYN != 0 && tcp_flags & ACK == 0 =>
        {
            State::SynSent
        }
        (s, _) => s,
    }
}

/// How long a connection in `state` lives without traffic, in nanoseconds.
pub fn timeout(proto: u8, state: State) -> u64 {
    let secs = match (proto, state) {
        (PROTO_TCP, State::SynSent) => 5,
        (PROTO_TCP, State::SynRecv) => 60,
        (PROTO_TCP, State::Established | State::New) => 86_400,
        (PROTO_TCP, State::PickedUp) => 300,
        (PROTO_TCP, State::Closing) => 120,
        (PROTO_TCP, State::Reset) => 10,
        (PROTO_ICMP | PROTO_ICMPV6, _) => 30,
        (_, State::Established) => 120,
        _ => 30,
    };
    secs * SECOND
}

/// When a connection in protocol state `state` (as stored) expiring at `expires` last saw a
/// packet, or `None` when it is [`State::assured`]: the order in which connections yield
/// their place when room runs out (`Conntrack::insert_evicting`), earliest first. The
/// protocol is not stored with the state; the states that yield take the same timeout
/// whatever it is, except `New`, which only datagram and echo flows have.
pub fn last_seen(state: u8, expires: u64) -> Option<u64> {
    let state = State::from_u8(state);
    if state.assured() {
        return None;
    }
    let proto = match state {
        State::New => crate::packet::PROTO_UDP,
        _ => PROTO_TCP,
    };
    Some(expires.saturating_sub(timeout(proto, state)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcp_flags::*;

    #[test]
    fn tcp_handshake_and_close() {
        let s = initial(PROTO_TCP, SYN);
        assert_eq!(s, State::SynSent);
        assert_eq!(timeout(PROTO_TCP, s), 5 * SECOND);
        let s = next(PROTO_TCP, s, Direction::Reply, SYN | ACK);
        assert_eq!(s, State::SynRecv);
        let s = next(PROTO_TCP, s, Direction::Original, ACK);
        assert_eq!(s, State::Established);
        assert_eq!(timeout(PROTO_TCP, s), 86_400 * SECOND);
        let s = next(PROTO_TCP, s, Direction::Reply, FIN | ACK);
        assert_eq!(timeout(PROTO_TCP, s), 120 * SECOND);
        assert_eq!(next(PROTO_TCP, s, Direction::Original, RST), State::Reset);
    }

    #[test]
    fn a_mid_stream_pickup_is_unassured_for_300_s_until_answered() {
        for first in [ACK, FIN | ACK, FIN, SYN | ACK, ACK | 0x08] {
            let s = initial(PROTO_TCP, first);
            assert_eq!(s, State::PickedUp, "first flags {first:#x}");
            assert!(!s.assured());
            assert_eq!(timeout(PROTO_TCP, s), 300 * SECOND);
        }
        // More from the same side proves nothing: still unassured, still 300 s.
        for more in [ACK, ACK | 0x08, FIN | ACK, FIN, SYN | FIN] {
            let s = next(PROTO_TCP, State::PickedUp, Direction::Original, more);
            assert_eq!(s, State::PickedUp, "flags {more:#x}");
        }
        // The first packet back establishes it, whatever it carries but a RST or FIN.
        for back in [ACK, ACK | 0x08, SYN | ACK] {
            let s = next(PROTO_TCP, State::PickedUp, Direction::Reply, back);
            assert_eq!(s, State::Established, "flags {back:#x}");
            assert!(s.assured());
            assert_eq!(timeout(PROTO_TCP, s), 86_400 * SECOND);
        }
        let s = next(PROTO_TCP, State::PickedUp, Direction::Reply, FIN | ACK);
        assert_eq!(s, State::Closing, "answered, and closing");
        // A RST either way resets it (a backend answers a spoofed ACK with one).
        for dir in [Direction::Original, Direction::Reply] {
            let s = next(PROTO_TCP, State::PickedUp, dir, RST | ACK);
            assert_eq!(s, State::Reset);
            assert!(!s.assured());
        }
        // A client's new SYN on the tuple starts a handshake.
        let s = next(PROTO_TCP, State::PickedUp, Direction::Original, SYN);
        assert_eq!(s, State::SynSent);
        // It yields in the order it was last seen, like the other unassured states.
        assert_eq!(
            last_seen(State::PickedUp as u8, 400 * SECOND),
            Some(100 * SECOND)
        );
    }

    #[test]
    fn a_fin_does_not_assure_a_connection_nobody_answered() {
        // Spoofed pairs: SYN then FIN, RST then FIN, stay unassured.
        for dir in [Direction::Original, Direction::Reply] {
            assert_eq!(
                next(PROTO_TCP, State::SynSent, dir, FIN | ACK),
                State::SynSent
            );
            assert_eq!(next(PROTO_TCP, State::Reset, dir, FIN), State::Reset);
        }
        // Once answered, a FIN closes as before.
        for s in [State::SynRecv, State::Established] {
            assert_eq!(
                next(PROTO_TCP, s, Direction::Original, FIN | ACK),
                State::Closing
            );
        }
    }

    #[test]
    fn state_bytes_never_change() {
        // They cross a handover: an older or newer successor must read them alike.
        let all = [
            (State::New, 0),
            (State::SynSent, 1),
            (State::SynRecv, 2),
            (State::Established, 3),
            (State::Closing, 4),
            (State::Reset, 5),
            (State::PickedUp, 6),
        ];
        for (s, byte) in all {
            assert_eq!(s as u8, byte);
            assert_eq!(State::from_u8(byte), s);
        }
        assert_eq!(State::from_u8(7), State::New);
    }

    #[test]
    fn udp_becomes_a_stream_when_answered() {
        let s = initial(17, 0);
        assert_eq!(timeout(17, s), 30 * SECOND);
        let s = next(17, s, Direction::Original, 0);
        assert_eq!(s, State::New);
        let s = next(17, s, Direction::Reply, 0);
        assert_eq!(timeout(17, s), 120 * SECOND);
    }

    #[test]
    fn only_unfinished_handshakes_and_one_way_flows_yield_and_in_order_of_last_packet() {
        for s in [
            State::New,
            State::SynSent,
            State::SynRecv,
            State::Reset,
            State::PickedUp,
        ] {
            assert!(!s.assured(), "{s:?}");
        }
        for s in [State::Established, State::Closing] {
            assert!(s.assured(), "{s:?}");
            assert_eq!(last_seen(s as u8, 1000 * SECOND), None);
        }
        // A SYN sent at 100 s and a SYN-ACK seen at 90 s: the SYN-ACK's is older, though
        // it expires later.
        let syn = last_seen(State::SynSent as u8, 105 * SECOND);
        let syn_ack = last_seen(State::SynRecv as u8, 150 * SECOND);
        assert_eq!(syn, Some(100 * SECOND));
        assert_eq!(syn_ack, Some(90 * SECOND));
        assert_eq!(
            last_seen(State::New as u8, 130 * SECOND),
            Some(100 * SECOND)
        );
    }
}
