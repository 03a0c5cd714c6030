//! Fuzz targets for nat's parsers and rewrites (issue 10), on the stable toolchain.
//!
//! Every case is a string of PRNG bytes that the structure-aware generator in
//! `dataplane/tests/fuzzgen` turns into a frame (mostly valid, then often mutated) and
//! into the rewrites applied to it. Asserted, whatever the bytes:
//!
//! - [`packet::parse`], [`packet::parse_quoted`], the rewrites, [`packet::decrement_ttl`]
//!   and [`wire::read_message`] never panic;
//! - what `parse` accepts, an independent parser reads the same way (addresses, protocol,
//!   ports, TTL, fragment flags), and lies inside the frame;
//! - a rewrite of a packet whose checksums verified leaves them verifying (IPv4 header,
//!   TCP, UDP, ICMP, ICMPv6, SCTP's CRC32c, checked by code independent of
//!   `nat::checksum`), and parsing the result gives the updated headers back;
//! - an ICMP error rewritten with its quote and `fix_icmp_checksum` verifies;
//! - a control-stream frame that decodes encodes back to the same message.
//!
//! Smoke mode by default (a few seconds in debug); `KXDP_FUZZ_CASES=N` for a long run
//! (with `--release`), `KXDP_FUZZ_SEED` to change the seed, `KXDP_FUZZ_CASE` to replay one
//! case. A failure prints the seed, the case and its input in hex.

#[path = "../../dataplane/tests/fuzzgen/mod.rs"]
mod fuzzgen;

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use fuzzgen::{check_frame, fold, hex, sum16, Rng, Src, L4};
use nat::packet::{self, End, Headers};
use nat::wire::{self, Message};

/// Cases per smoke run: a few seconds in a debug build.
const SMOKE_CASES: u64 = 150_000;
/// Bytes of PRNG input per case; the generator rarely needs more.
const CASE_BYTES: usize = 512;

/// How far cases got, printed at the end so a generator that stops reaching the
/// interesting code shows: parsed, rewritten with checksums checked, quotes rewritten.
static PARSED: AtomicU64 = AtomicU64::new(0);
static CHECKED: AtomicU64 = AtomicU64::new(0);
static QUOTES: AtomicU64 = AtomicU64::new(0);

/// One fuzz case: the PRNG input, a place to leave what was generated from it for the
/// failure report, and `Err` for a broken promise.
type Case = fn(&[u8], &RefCell<Vec<u8>>) -> Result<(), String>;

/// Runs `case` over `count` PRNG inputs, reporting any failure or panic with its input.
fn run(target: &str, count_var: &str, smoke: u64, case: Case) {
    let st = fuzzgen::settings(count_var, smoke);
    let started = std::time::Instant::now();
    let cases: Box<dyn Iterator<Item = u64>> = match st.only {
        Some(n) => Box::new(std::iter::once(n)),
        None => Box::new(0..st.count),
    };
    let mut ran = 0;
    for n in cases {
        let input = Rng::new(fuzzgen::case_seed(st.seed, n)).bytes(CASE_BYTES);
        let made = RefCell::new(Vec::new());
        let result = catch_unwind(AssertUnwindSafe(|| case(&input, &made)));
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(why)) => Some(why),
            Err(panic) => Some(format!(
                "panic: {}",
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        };
        if let Some(why) = failure {
            panic!(
                "fuzz {target}: {why}\n  replay: KXDP_FUZZ_SEED={:#x} KXDP_FUZZ_CASE={n}\n  generated: {}\n  input: {}",
                st.seed,
                hex(&made.borrow()),
                hex(&input)
            );
        }
        ran += 1;
    }
    fuzzgen::report(target, st.seed, ran, "cases", started);
    if target != "packet" {
        return;
    }
    eprintln!(
        "fuzz {target}: {} parsed, {} rewrites with valid checksums checked, {} quotes rewritten",
        PARSED.load(Relaxed),
        CHECKED.load(Relaxed),
        QUOTES.load(Relaxed)
    );
}

fn palette() -> fuzzgen::Palette {
    let mut p = fuzzgen::layout_palette();
    p.v4.push(Ipv4Addr::UNSPECIFIED);
    p.v6.push(Ipv6Addr::UNSPECIFIED);
    p
}

fn addr(s: &mut Src, pal: &fuzzgen::Palette, v6: bool) -> IpAddr {
    if v6 {
        pal.v6(s).into()
    } else {
        pal.v4(s).into()
    }
}

#[test]
fn fuzz_packet_parsers_and_rewrites() {
    run("packet", "KXDP_FUZZ_CASES", SMOKE_CASES, packet_case);
}

/// One frame through `parse`, the rewrites, `decrement_ttl` and the ICMP-error path.
fn packet_case(input: &[u8], made: &RefCell<Vec<u8>>) -> Result<(), String> {
    let pal = palette();
    let mut s = Src::new(input);
    let mut f = if s.chance(1, 8) {
        let n = s.below(160);
        s.bytes(n)
    } else {
        let mut f = fuzzgen::frame_gen(&mut s, &pal, 0);
        if s.chance(2, 5) {
            fuzzgen::mutate(&mut s, &mut f);
        }
        f
    };
    *made.borrow_mut() = f.clone();
    let Ok(mut h) = packet::parse(&f) else {
        return Ok(());
    };
    let complete = !h.later_fragment && !h.first_fragment;
    let valid_before = complete && check_frame(&f, None).is_ok_and(|c| c.l4 == L4::Valid);
    agrees_with_independent_parse(&f, &h)?;
    PARSED.fetch_add(1, Relaxed);

    if packet::is_icmp_error(&h) && s.chance(1, 2) {
        return icmp_error_case(&mut s, &pal, &mut f, &mut h);
    }

    if s.chance(1, 5) {
        let before = h.ttl;
        let ttl = packet::decrement_ttl(&mut f, &mut h);
        if ttl != before.saturating_sub(1) {
            return Err(format!("decrement_ttl: {before} became {ttl}"));
        }
    }
    for _ in 0..1 + s.below(3) {
        let end = if s.chance(1, 2) {
            End::Source
        } else {
            End::Destination
        };
        let ip = addr(&mut s, &pal, h.v6);
        let port = pal.port(&mut s);
        packet::rewrite(&mut f, &mut h, end, ip, port);
    }
    let after = check_frame(&f, None).map_err(|e| format!("after rewrite: {e}"))?;
    CHECKED.fetch_add(valid_before as u64, Relaxed);
    if valid_before && after.l4 != L4::Valid {
        return Err(format!("rewrite broke a valid checksum: {:?}", after.l4));
    }
    // What the rewrite says it wrote is what the packet now says.
    let again =
        packet::parse(&f).map_err(|e| format!("rewritten packet no longer parses: {e:?}"))?;
    let tracked = matches!(
        h.proto,
        packet::PROTO_TCP
            | packet::PROTO_UDP
            | packet::PROTO_SCTP
            | packet::PROTO_ICMP
            | packet::PROTO_ICMPV6
    );
    // A later fragment has no ports to write (the pipeline drops those before any rewrite),
    // so only its addresses are compared.
    if tracked && !h.later_fragment && again != h {
        return Err(format!(
            "re-parse after rewrite: {again:?}, rewrite said {h:?}"
        ));
    }
    if (again.src, again.dst) != (h.src, h.dst) {
        return Err(format!(
            "addresses after rewrite: {again:?}, rewrite said {h:?}"
        ));
    }
    Ok(())
}

/// Compares what `parse` accepted with the independent parser of `fuzzgen`.
fn agrees_with_independent_parse(f: &[u8], h: &Headers) -> Result<(), String> {
    if !(h.l3 == 14 && h.l3 < h.l4 && h.l4 <= h.end && h.end <= f.len()) {
        return Err(format!(
            "offsets out of the frame: {h:?} in {} bytes",
            f.len()
        ));
    }
    let c =
        check_frame(f, None).map_err(|e| format!("parse accepted what is broken ({e}): {h:?}"))?;
    let v = c.ip.ok_or("parse accepted a frame without IP")?;
    if v.extensions.iter().any(|e| *e != 44) || v.extensions.len() > 1 {
        return Ok(());
    }
    let mine = (
        v.v6,
        v.src,
        v.dst,
        v.proto,
        v.ttl,
        v.l4,
        v.end,
        v.later_fragment,
    );
    let theirs = (
        h.v6,
        h.src,
        h.dst,
        h.proto,
        h.ttl,
        h.l4,
        h.end,
        h.later_fragment,
    );
    if mine != theirs {
        return Err(format!("parse: {theirs:?}, independent parse: {mine:?}"));
    }
    if h.first_fragment != (v.fragment && !v.later_fragment) {
        return Err(format!(
            "first_fragment {} but independent parse {v:?}",
            h.first_fragment
        ));
    }
    if !h.later_fragment && (h.sport, h.dport) != (v.sport, v.dport) {
        return Err(format!(
            "ports {}/{}, independent parse {}/{}",
            h.sport, h.dport, v.sport, v.dport
        ));
    }
    Ok(())
}

/// An ICMP error: its quote parsed and rewritten, outer addresses set, checksum fixed.
fn icmp_error_case(
    s: &mut Src,
    pal: &fuzzgen::Palette,
    f: &mut [u8],
    h: &mut Headers,
) -> Result<(), String> {
    let Some(mut q) = packet::parse_quoted(f, h) else {
        return Ok(());
    };
    let hdr = if q.v6 { 40 } else { 20 };
    if q.l3 != h.l4 + 8 || q.l4 < q.l3 + hdr || q.l4 + 8 > f.len() || q.end != h.end || q.v6 != h.v6
    {
        return Err(format!(
            "quote out of place: {q:?} in {h:?}, {} bytes",
            f.len()
        ));
    }
    let qs = (addr(s, pal, q.v6), pal.port(s));
    let qd = (addr(s, pal, q.v6), pal.port(s));
    packet::rewrite_quoted(f, &mut q, qs, qd);
    QUOTES.fetch_add(1, Relaxed);
    let (src, dst) = (addr(s, pal, h.v6), addr(s, pal, h.v6));
    packet::set_addresses(f, h, src, dst);
    packet::fix_icmp_checksum(f, h);
    let c = check_frame(f, None).map_err(|e| format!("after ICMP error rewrite: {e}"))?;
    let complete = !h.later_fragment && !h.first_fragment;
    // ICMPv6 in IPv4 (or ICMP in IPv6) has no checksum rule to meet.
    let proper = (h.proto == packet::PROTO_ICMPV6) == h.v6;
    if complete && proper && c.l4 != L4::Valid {
        return Err(format!(
            "ICMP error checksum after fix_icmp_checksum: {:?}",
            c.l4
        ));
    }
    // The quote's IPv4 header, when it is all there, verifies.
    if !q.v6 {
        let ihl = (f[q.l3] & 0x0f) as usize * 4;
        if q.l3 + ihl <= h.end && fold(sum16(&f[q.l3..q.l3 + ihl], 0)) != 0xffff {
            return Err("quoted IPv4 header checksum after rewrite_quoted".into());
        }
    }
    let again = packet::parse_quoted(f, h).ok_or("rewritten quote no longer parses")?;
    if (again.src, again.dst) != (qs.0, qd.0) {
        return Err(format!(
            "quote addresses {:?}, wrote {qs:?} {qd:?}",
            (again.src, again.dst)
        ));
    }
    if matches!(
        again.proto,
        packet::PROTO_TCP | packet::PROTO_UDP | packet::PROTO_SCTP
    ) && (again.sport, again.dport) != (qs.1, qd.1)
    {
        return Err(format!(
            "quote ports {:?}, wrote {qs:?} {qd:?}",
            (again.sport, again.dport)
        ));
    }
    Ok(())
}

#[test]
fn fuzz_control_stream_frames() {
    run("wire", "KXDP_FUZZ_STREAMS", 20_000, wire_case);
}

/// A random message, as either side may send.
fn message_gen(s: &mut Src) -> Message {
    let text = |s: &mut Src| -> String {
        let n = s.below(24);
        String::from_utf8_lossy(&s.bytes(n)).into_owned()
    };
    match s.below(8) {
        0 => Message::Snapshot {
            generation: s.u32() as u64,
            tables: Box::new(fuzzgen::table_spec_gen(s)),
        },
        1 => Message::Applied {
            generation: s.u32() as u64,
        },
        2 => Message::GetStats,
        3 => Message::Refused { reason: text(s) },
        4 => Message::GetConntrack {
            addr: s.chance(1, 2).then(|| IpAddr::V4(Ipv4Addr::from(s.u32()))),
            port: s.chance(1, 2).then(|| s.u16()),
            protocol: s.chance(1, 2).then(|| s.u8()),
            limit: s.u16() as usize,
        },
        5 => Message::Monitor {
            addr: None,
            port: s.chance(1, 2).then(|| s.u16()),
            drops_only: s.chance(1, 2),
        },
        6 => Message::ExplainPolicy {
            src: IpAddr::V4(Ipv4Addr::from(s.u32())),
            dst: IpAddr::V6(Ipv6Addr::from(s.u32() as u128)),
            protocol: None,
            port: s.u16(),
        },
        _ => Message::Stats {
            generation: s.u32() as u64,
            conntrack: s.u16() as usize,
            conntrack_capacity: s.u16() as usize,
            workers: vec![vec![(text(s), s.u32() as u64)]],
            policy_drops: Vec::new(),
            refused_tables: 0,
            poll_mode: text(s),
        },
    }
}

/// Reframes `payload` with a header that announces its length.
fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = wire::MAGIC.to_vec();
    out.extend_from_slice(&nat::spec::SPEC_VERSION.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A byte stream into `read_message` until it refuses: random bytes, a valid header before
/// noise, valid messages with their JSON mutated, truncated or concatenated.
fn wire_case(input: &[u8], made: &RefCell<Vec<u8>>) -> Result<(), String> {
    let mut s = Src::new(input);
    let stream = match s.below(6) {
        0 => {
            let n = s.below(64);
            s.bytes(n)
        }
        1 => {
            let n = s.below(64);
            let noise = s.bytes(n);
            let mut f = framed(&noise);
            if s.chance(1, 2) {
                let len = s.u32() % (wire::MAX_PAYLOAD as u32 + 2);
                f[8..12].copy_from_slice(&len.to_be_bytes());
            }
            f
        }
        2 | 3 => {
            // JSON with a few bytes changed, framed to its new length.
            let mut json = serde_json_payload(&message_gen(&mut s));
            for _ in 0..1 + s.below(3) {
                if json.is_empty() {
                    break;
                }
                let i = s.below(json.len());
                match s.below(3) {
                    0 => {
                        json.remove(i);
                    }
                    1 => json.insert(i, s.pick(b"{}[]\":,-01e.nul\\")),
                    _ => json[i] = s.pick(b"{}[]\":,-019eEtfnul\\ "),
                }
            }
            framed(&json)
        }
        4 => {
            let mut f = wire::encode(&message_gen(&mut s));
            let cut = s.below(f.len() + 1);
            f.truncate(cut);
            f
        }
        _ => {
            let mut f = wire::encode(&message_gen(&mut s));
            f.extend(wire::encode(&message_gen(&mut s)));
            if s.chance(1, 2) {
                let i = s.below(f.len());
                f[i] ^= 1 << s.below(8);
            }
            f
        }
    };
    *made.borrow_mut() = stream.clone();
    let mut r = std::io::Cursor::new(&stream);
    for _ in 0..4 {
        let Ok(msg) = wire::read_message(&mut r) else {
            break;
        };
        let back = wire::read_message(&mut std::io::Cursor::new(wire::encode(&msg)))
            .map_err(|e| format!("{msg:?} does not decode after encoding: {e}"))?;
        if back != msg {
            return Err(format!("round trip: {msg:?} came back as {back:?}"));
        }
    }
    Ok(())
}

fn serde_json_payload(msg: &Message) -> Vec<u8> {
    wire::encode(msg)[wire::HEADER_LEN..].to_vec()
}

/// An IPv6 TCP SYN behind two atomic fragment headers (offset 0, M clear), the generated
/// frame of `KXDP_FUZZ_SEED=0x6b786470f0222026 KXDP_FUZZ_CASE=35748` with a fresh checksum.
/// The receiving kernel skips both headers and takes the TCP segment (RFC 8200 4.5, RFC
/// 6946); `parse` walks only the first and reports protocol 44 with no ports.
fn nested_fragment_headers() -> Vec<u8> {
    let src: Ipv6Addr = "2001:db8:1b::4".parse().unwrap();
    let dst: Ipv6Addr = "2001:db8:e::6".parse().unwrap();
    let syn = fuzzgen::tcp(40000, 80, 1, 0, fuzzgen::flags::SYN, &[], b"");
    let exts = [
        fuzzgen::Ext::Fragment(0, false),
        fuzzgen::Ext::Fragment(0, false),
    ];
    let ip = fuzzgen::ipv6(src, dst, fuzzgen::TCP, syn, 64, 0, &exts);
    fuzzgen::ethernet([2, 0, 0, 1, 0, 2], [2, 0, 0, 1, 0, 1], 0x86dd, &ip)
}

#[test]
fn nested_ipv6_fragment_headers_are_not_a_transport() {
    let f = nested_fragment_headers();
    match packet::parse(&f) {
        Err(_) => {}
        Ok(h) => assert!(
            h.proto == packet::PROTO_TCP && (h.sport, h.dport) == (40000, 80),
            "parsed as protocol {} ports {}/{}: {h:?}",
            h.proto,
            h.sport,
            h.dport
        ),
    }
}

/// Found by `fuzz_packet_parsers_and_rewrites` (seed 0x1352903, case 9675317): an echo
/// reply with sequence 0 and no data whose identifier is rewritten to 0 (as an echo reply
/// to a pod that pinged with identifier 0 is, on its way back through masquerade). The
/// message is then all zeros; its checksum must be 0xffff (RFC 1624 section 3), and the
/// incremental update leaves 0x0000, which receivers reject.
#[test]
fn icmp_echo_rewritten_to_all_zeros_keeps_a_valid_checksum() {
    let reply = fuzzgen::icmp(0, 0, [0x65, 0xc6, 0, 0], b"");
    let ip = fuzzgen::ipv4(
        "192.168.0.3".parse().unwrap(),
        "192.168.0.2".parse().unwrap(),
        fuzzgen::ICMP,
        reply,
        &fuzzgen::V4Opts::default(),
    );
    let mut f = fuzzgen::ethernet([2; 6], [4; 6], 0x0800, &ip);
    assert_eq!(check_frame(&f, None).unwrap().l4, L4::Valid);
    let mut h = packet::parse(&f).unwrap();
    packet::rewrite(
        &mut f,
        &mut h,
        End::Source,
        "10.244.1.11".parse().unwrap(),
        0,
    );
    assert_eq!(check_frame(&f, None).unwrap().l4, L4::Valid, "{}", hex(&f));
}

/// Found by `fuzz_pipeline` (seed 0x1352903, episode 885, step 1973): a Service connection
/// masqueraded to a port an expired, not yet swept connection had used. `insert` takes
/// it (the old one is not live), but `get` on the shared tuple finds the expired entry
/// first and answers "not tracked", so the backend's reply is dropped (ToHost) until the
/// next sweep. Here with two connections sharing their reply tuple.
#[test]
fn expired_entry_hides_a_new_one_with_the_same_tuple() {
    use nat::conntrack::{Connection, Conntrack, FlowKey};
    let key = |src: &str, sport, dst: &str, dport| FlowKey {
        proto: packet::PROTO_TCP,
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        sport,
        dport,
    };
    let reply = key("10.244.1.13", 5000, "10.244.1.1", 48362);
    let old = Connection {
        original: key("203.0.113.9", 1111, "172.30.0.10", 443),
        reply,
        service: 1,
        policy: 0,
    };
    let new = Connection {
        original: key("203.0.113.7", 20183, "172.30.0.10", 443),
        reply,
        service: 1,
        policy: 0,
    };
    let ct = Conntrack::new(64);
    ct.insert(old, 0, 10).unwrap();
    // At 20 the old connection has expired; no sweep has run.
    ct.insert(new, 20, 10).expect("the tuple is free again");
    assert!(ct.get(&new.original, 20).is_some());
    let hit = ct
        .get(&reply, 20)
        .expect("the new connection's reply tuple is tracked");
    assert_eq!(hit.conn, new);
}
