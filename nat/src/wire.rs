//! The framing of the control stream between `kxdp-control` and `kxdp-dataplane`.
//!
//! A frame is `b"KXDP"`, the format version as a big-endian `u32`, the payload length as a
//! big-endian `u32`, then a JSON payload (a [`Message`]). JSON keeps the stream readable with
//! `socat` at 3 a.m.; the version lets either side refuse a peer it does not understand
//! instead of misreading it. Encoding and decoding are pure: the sockets live elsewhere.

use serde::{Deserialize, Serialize};

use crate::spec::{TableDelta, TableSpec, SPEC_VERSION};

/// Frame magic.
pub const MAGIC: &[u8; 4] = b"KXDP";
/// Header length: magic, version, payload length.
pub const HEADER_LEN: usize = 12;
/// The largest payload accepted (a full table of 100k Services fits with room to spare).
pub const MAX_PAYLOAD: usize = 1 << 30;

/// A message on the control stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// control → dataplane: the complete desired state, replacing what the dataplane has.
    /// `generation` increases with every table control computes.
    Snapshot {
        /// Monotonic number of this table within one control process.
        generation: u64,
        /// The tables.
        tables: Box<TableSpec>,
    },
    /// control → dataplane: what changed since generation `base`, which the dataplane
    /// acknowledged on this connection; applied, it makes `generation`. A dataplane that
    /// does not have `base` answers [`Message::NeedSnapshot`].
    Delta {
        /// The generation the delta makes.
        generation: u64,
        /// The generation it applies to.
        base: u64,
        /// The changes.
        delta: Box<TableDelta>,
    },
    /// dataplane → control: the delta's base is not the table in use (`have` is); send a
    /// snapshot. Nothing was changed.
    NeedSnapshot {
        /// The generation the dataplane has (0: none from control yet).
        have: u64,
    },
    /// dataplane → control: `generation` is now what the workers use.
    Applied {
        /// The generation applied.
        generation: u64,
    },
    /// inspection → dataplane: send the counters.
    GetStats,
    /// dataplane → inspection: per-worker counters and table occupancy.
    Stats {
        /// Generation of the tables in use.
        generation: u64,
        /// Tracked connections.
        conntrack: usize,
        /// Capacity of the connection table.
        conntrack_capacity: usize,
        /// Per worker: named counters.
        workers: Vec<Vec<(String, u64)>>,
        /// Connections refused by NetworkPolicy, by `pod ns/name ingress|egress` and by
        /// `policy ns/name` (each policy isolating the pod); zeros left out.
        #[serde(default)]
        policy_drops: Vec<(String, u64)>,
        /// Tables from control refused by validation since start.
        #[serde(default)]
        refused_tables: u64,
        /// How the workers wait for packets (`busy`, `adaptive`, `interrupt`); empty from a
        /// dataplane that does not say.
        #[serde(default)]
        poll_mode: String,
    },
    /// inspection → dataplane: which NetworkPolicy decides a new connection from `src` to
    /// `dst`:`port`, as the dataplane would judge it now. A Service frontend is explained
    /// for each of its serving endpoints.
    ExplainPolicy {
        /// The client.
        src: std::net::IpAddr,
        /// The destination as the client addresses it (a pod, a Service frontend, any IP).
        dst: std::net::IpAddr,
        /// Transport protocol; `None` for ICMP (which only rules without ports allow).
        protocol: Option<crate::spec::Protocol>,
        /// Destination port.
        port: u16,
    },
    /// dataplane → inspection: the answer to [`Message::ExplainPolicy`].
    PolicyExplained {
        /// One path per destination after translation.
        paths: Vec<ExplainedPath>,
    },
    /// inspection → dataplane: every Service port as the workers see it.
    GetServices,
    /// dataplane → inspection: the answer to [`Message::GetServices`].
    Services {
        /// Generation of the tables in use.
        generation: u64,
        /// One per (Service, port, IP family).
        services: Vec<ServiceView>,
    },
    /// inspection → dataplane: tracked connections matching a filter.
    GetConntrack {
        /// Keep connections with this address in either tuple.
        addr: Option<std::net::IpAddr>,
        /// Keep connections with this port in either tuple.
        port: Option<u16>,
        /// Keep connections of this IP protocol number.
        protocol: Option<u8>,
        /// At most this many entries (the counts cover all).
        limit: usize,
    },
    /// inspection → dataplane: stream flow events (new connections with their
    /// translation and policy verdict, drops with their reason) until the reader hangs
    /// up. One reader at a time.
    Monitor {
        /// Keep events with this address in the source, destination or translation.
        addr: Option<std::net::IpAddr>,
        /// Keep events with this port likewise.
        port: Option<u16>,
        /// Keep only drops (policy refusals included).
        drops_only: bool,
    },
    /// dataplane → inspection: a batch of flow events, and how many were lost (the rings
    /// were full) since the last batch.
    FlowEvents {
        /// The events, oldest first.
        events: Vec<FlowEvent>,
        /// Events the workers could not record since the last batch.
        lost: u64,
    },
    /// new dataplane → running dataplane: hand over to me. The running one refuses (and
    /// keeps forwarding) unless `version` is its own; else it answers
    /// [`Message::HandoverOffer`], still forwarding.
    Handover {
        /// The successor's handover format version.
        version: u32,
    },
    /// running dataplane → new dataplane: its tables and the shape of its rings, sent while
    /// it still forwards, so that the successor prepares everything it can before it asks
    /// for the rest ([`Message::HandoverTake`]). Each worker's UMEM (a memfd) follows as a
    /// descriptor (`pktio::fdpass`), in worker order.
    HandoverOffer {
        /// The handover format version.
        version: u32,
        /// Generation of the tables.
        generation: u64,
        /// The tables.
        tables: Box<TableSpec>,
        /// Its workers' AF_XDP devices and interfaces.
        shape: RingShape,
    },
    /// new dataplane → running dataplane, after [`Message::HandoverOffer`]: stop forwarding
    /// and send the state. With `rings` the running one hands over its AF_XDP sockets,
    /// UMEMs and XDP links as they are (the successor takes over the rings in place: no
    /// gap); without, it releases its interfaces for the successor to attach again.
    HandoverTake {
        /// Hand over the rings in place.
        rings: bool,
        /// The successor's devices expect frames stamped by the XDP program
        /// (`--measure-ring-wait`). Absent from a successor older than stamping, which
        /// never gets stamped rings in place: it would read each stamp as the frame's
        /// first bytes.
        #[serde(default)]
        stamped: Option<bool>,
    },
    /// running dataplane → new dataplane, after [`Message::HandoverTake`]: everything it
    /// needs to carry on, sent once the old workers stopped. With `rings`, the descriptors
    /// follow on the same connection (`pktio::fdpass`): each device's sockets in order,
    /// then each link.
    HandoverState {
        /// The handover format version.
        version: u32,
        /// Generation of the tables.
        generation: u64,
        /// The tables, if they changed since the offer.
        tables: Option<Box<TableSpec>>,
        /// Every live connection.
        connections: Vec<HandedConnection>,
        /// Learned neighbours: address, port name, MAC.
        neighbors: Vec<(std::net::IpAddr, String, [u8; 6])>,
        /// The rings, when asked for.
        rings: Option<HandedRings>,
    },
    /// new dataplane → old dataplane, after [`Message::HandoverState`]: the successor
    /// forwards on every interface; the old process exits. Until this arrives the old
    /// process has not given up: without it (a deadline passes, or the connection drops) it
    /// takes its interfaces back and forwards again.
    HandoverDone,
    /// new dataplane → old dataplane, after [`Message::HandoverOffer`] or
    /// [`Message::HandoverState`]: the successor could not take over (it released whatever
    /// it had attached); the old process resumes now.
    HandoverAborted {
        /// What went wrong.
        reason: String,
    },
    /// dataplane → inspection: the answer to [`Message::GetConntrack`].
    Conntrack {
        /// Live connections in the table.
        total: usize,
        /// Of which match the filter.
        matched: usize,
        /// The first `limit` matching, ordered by original tuple.
        entries: Vec<ConnView>,
    },
    /// CNI plugin → dataplane: a pod's interface was created (the host end of its veth
    /// pair, in the dataplane's namespace); start serving it. Answered
    /// [`Message::PodAttached`], or [`Message::Refused`] with nothing attached.
    AttachPod {
        /// The host end's name (`kxdp` and 11 hex digits, from the container ID).
        ifname: String,
        /// The runtime's container ID (`CNI_CONTAINERID`).
        container_id: String,
        /// The pod's addresses on that interface, as IPAM gave them.
        ips: Vec<std::net::IpAddr>,
    },
    /// dataplane → CNI plugin: `ifname` is served.
    PodAttached {
        /// The interface attached.
        ifname: String,
    },
    /// CNI plugin → dataplane: the pod is going away; stop serving `ifname` and retire
    /// its connections. Answered [`Message::PodDetached`] (also for an unknown
    /// interface: `found` is false), or [`Message::Refused`].
    DetachPod {
        /// The host end's name.
        ifname: String,
        /// The runtime's container ID.
        container_id: String,
    },
    /// dataplane → CNI plugin: `ifname` is no longer served.
    PodDetached {
        /// The interface detached.
        ifname: String,
        /// Whether it was attached.
        found: bool,
    },
    /// Either side: the last frame was refused, and why.
    Refused {
        /// What was wrong.
        reason: String,
    },
    /// dataplane → control: another connection programs the tables (one control per
    /// dataplane); nothing was changed and this connection is closed. Try again later.
    Busy {
        /// Who holds the tables, and since when.
        reason: String,
    },
}

/// Why a frame could not be decoded.
/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// A new connection to a Service, translated (`to`: the backend; `masquerade`: the
    /// source it leaves with, if masqueraded).
    Translated,
    /// A new untranslated connection of a local pod, tracked.
    Tracked,
    /// A new pod connection masqueraded out of the cluster (`masquerade`: node ip:port).
    Masqueraded,
    /// A new connection refused by NetworkPolicy.
    PolicyDenied,
    /// A packet dropped (`reason`).
    Drop,
}

/// One flow event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEvent {
    /// Dataplane clock, ns.
    pub at: u64,
    /// The worker that saw it.
    pub worker: u16,
    /// What happened.
    pub kind: EventKind,
    /// IP protocol number.
    pub protocol: u8,
    /// Source address and port (ICMP echo: identifier) as the packet arrived.
    pub src: (std::net::IpAddr, u16),
    /// Destination as the packet arrived.
    pub dst: (std::net::IpAddr, u16),
    /// The translated destination, for a translated connection.
    pub to: Option<(std::net::IpAddr, u16)>,
    /// The source after masquerade, if masqueraded.
    pub masquerade: Option<(std::net::IpAddr, u16)>,
    /// The policy that allowed it (`namespace/name`), when a policy isolated either end.
    pub policy: Option<String>,
    /// A drop's reason (the counter's label).
    pub reason: Option<String>,
}

/// A connection handed from one dataplane process to its successor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedConnection {
    /// IP protocol number.
    pub proto: u8,
    /// Original tuple: source, destination, source port, destination port.
    pub original: (std::net::IpAddr, std::net::IpAddr, u16, u16),
    /// Reply tuple, likewise.
    pub reply: (std::net::IpAddr, std::net::IpAddr, u16, u16),
    /// Dense Service id (as of the handed tables).
    pub service: u32,
    /// NetworkPolicy verdict tag.
    pub policy: u32,
    /// Protocol state byte.
    pub state: u8,
    /// Nanoseconds it had left to live.
    pub remaining_ns: u64,
}

/// The sizes of one worker's AF_XDP device: its UMEM and each socket's rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingSizes {
    /// Chunks of the UMEM for the ports given at start.
    pub frame_count: u32,
    /// Bytes per chunk.
    pub frame_size: u32,
    /// Entries of each RX ring.
    pub rx_size: u32,
    /// Entries of each TX ring.
    pub tx_size: u32,
    /// Entries of each fill ring.
    pub fill_size: u32,
    /// Entries of each completion ring.
    pub comp_size: u32,
    /// Zero-copy sockets.
    pub zero_copy: bool,
    /// Ports that may be opened at run time.
    pub runtime_ports: u32,
    /// Frames arrive with the XDP program's stamp in front (`--measure-ring-wait`); absent
    /// from a predecessor that never stamps.
    #[serde(default)]
    pub stamped: bool,
}

/// What a running dataplane's rings look like, for a successor to decide whether it can
/// take them over in place.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingShape {
    /// Workers (one device each; worker i serves queue i of every interface).
    pub workers: u32,
    /// Every device's sizes.
    pub sizes: RingSizes,
    /// The interfaces it holds with an XDP link: name, ifindex.
    pub interfaces: Vec<(String, u32)>,
}

/// A running dataplane's AF_XDP devices and XDP links, handed to its successor; the
/// descriptors follow the message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedRings {
    /// One per worker, in order.
    pub devices: Vec<HandedDevice>,
    /// One per interface.
    pub links: Vec<HandedLink>,
}

/// One worker's device (its UMEM went with the offer); one descriptor per socket follows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedDevice {
    /// Sizes of the UMEM and rings.
    pub sizes: RingSizes,
    /// Chunks each fill ring of a port given at start is kept topped up to.
    pub fill_share: u32,
    /// Ports given at start.
    pub start_ports: u32,
    /// Its sockets, in the order of their descriptors.
    pub sockets: Vec<HandedSocket>,
    /// The chunks free in user space, as runs of consecutive chunks: the offset of the
    /// first into the UMEM and how many (a free list is mostly a few long runs).
    pub free: Vec<(u64, u32)>,
}

/// One AF_XDP socket of a [`HandedDevice`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedSocket {
    /// Interface index it is bound to.
    pub ifindex: u32,
    /// Queue.
    pub queue: u32,
    /// Completions reaped so far.
    pub completed: u32,
    /// Chunks its fill ring is kept topped up to.
    pub fill_share: u32,
}

/// One interface's XDP link; its descriptor follows the devices'.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedLink {
    /// The interface.
    pub name: String,
    /// Its index.
    pub ifindex: u32,
    /// Attached in native (driver) mode, else generic.
    pub native: bool,
}

/// One Service port, as inspected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    /// `namespace/name:port`.
    pub name: String,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// `kind ip:port` of every frontend (`ClusterIp`, `NodePort`, `LoadBalancer`,
    /// `ExternalIp`).
    pub frontends: Vec<String>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// Session affinity timeout, if ClientIP affinity is on.
    pub affinity_timeout_s: Option<u32>,
    /// Every endpoint the slices list, with its state and Maglev share.
    pub backends: Vec<BackendView>,
    /// `name kind ip:port` of each frontend another Service port claimed and was refused,
    /// this port's Service being the older ([`crate::spec::ServiceSpec::refused`]).
    #[serde(default)]
    pub refused: Vec<String>,
}

/// One endpoint of a Service port, as inspected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    /// `ip:port`.
    pub endpoint: String,
    /// On this node.
    pub local: bool,
    /// `serving` (new connections go there), `terminating` (serving but terminating,
    /// used only when nothing is ready), or `not serving`.
    pub state: String,
    /// Maglev weight (all endpoints weigh 1, as kube-proxy's).
    pub weight: u32,
    /// Share of the Cluster-policy Maglev ring's slots (0..1); 1 for a lone backend.
    pub cluster_share: f64,
    /// Share of the Local-policy ring's slots.
    pub local_share: f64,
}

/// One tracked connection, as inspected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnView {
    /// `tcp`, `udp`, `sctp`, `icmp`, `icmpv6`.
    pub protocol: String,
    /// The tuple the client sent, `src:port -> dst:port`.
    pub original: String,
    /// The tuple the other end replies with.
    pub reply: String,
    /// What translation does: `dnat`, `snat`, `dnat+snat` or `none`.
    pub nat: String,
    /// Protocol state (`SynSent`, `Established`, …).
    pub state: String,
    /// Seconds until it expires without traffic.
    pub expires_in_s: u64,
    /// The Service, for a translated Service connection.
    pub service: Option<String>,
    /// The NetworkPolicy verdict: `not isolated`, or `allowed by ns/name`.
    pub policy: String,
}

/// One destination of an explained connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainedPath {
    /// The Service port the destination was reached through, if any.
    pub service: Option<String>,
    /// The destination after translation.
    pub dst: std::net::IpAddr,
    /// Its port.
    pub port: u16,
    /// The source the destination sees (the client, or the masquerade address).
    pub peer: std::net::IpAddr,
    /// The source pod's egress.
    pub egress: ExplainedVerdict,
    /// The destination pod's ingress.
    pub ingress: ExplainedVerdict,
    /// Whether the connection would be admitted.
    pub allowed: bool,
}

/// One direction's verdict, explained.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainedVerdict {
    /// The pod judged (`namespace/name`), when the address is an isolated pod of this node.
    pub pod: Option<String>,
    /// The policies isolating it in this direction.
    pub isolating: Vec<String>,
    /// `not isolated`, `allowed`, `denied` or `node traffic` (always allowed in).
    pub verdict: String,
    /// The first policy allowing the connection, when one does.
    pub allowed_by: Option<String>,
}

/// Why a frame of the control stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The first bytes are not `KXDP`: the peer is not a kxdp control stream.
    #[error("bad magic {0:02x?}: the peer does not speak the kxdp control protocol")]
    BadMagic([u8; 4]),
    /// The peer speaks another format version.
    #[error("control stream version {got}, this binary speaks {want}: run control and dataplane from the same release")]
    Version {
        /// Version in the frame.
        got: u32,
        /// Version of this binary.
        want: u32,
    },
    /// The payload length is over [`MAX_PAYLOAD`].
    #[error("frame of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    /// The payload is not a valid message.
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Encodes `msg` as one frame.
pub fn encode(msg: &Message) -> Vec<u8> {
    let payload = serde_json::to_vec(msg).expect("messages always serialize");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&SPEC_VERSION.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Reads a header: the payload length that follows, or why the stream is unusable.
pub fn decode_header(header: &[u8; HEADER_LEN]) -> Result<usize, WireError> {
    let magic: [u8; 4] = header[0..4].try_into().expect("length 4");
    if &magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let version = u32::from_be_bytes(header[4..8].try_into().expect("length 4"));
    if version != SPEC_VERSION {
        return Err(WireError::Version {
            got: version,
            want: SPEC_VERSION,
        });
    }
    let len = u32::from_be_bytes(header[8..12].try_into().expect("length 4")) as usize;
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a payload whose header [`decode_header`] accepted.
pub fn decode_payload(payload: &[u8]) -> Result<Message, WireError> {
    Ok(serde_json::from_slice(payload)?)
}

/// Reads one frame from a blocking reader.
pub fn read_message<R: std::io::Read>(r: &mut R) -> std::io::Result<Message> {
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header)?;
    let len = decode_header(&header).map_err(std::io::Error::other)?;
    // Memory grows with the bytes that actually arrive, not with what a header announces:
    // one forged header must not make the reader allocate up to MAX_PAYLOAD at once.
    let mut payload = Vec::with_capacity(len.min(1 << 20));
    let got = std::io::Read::read_to_end(&mut std::io::Read::take(r, len as u64), &mut payload)?;
    if got < len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("frame announced {len} bytes, the stream ended after {got}"),
        ));
    }
    decode_payload(&payload).map_err(std::io::Error::other)
}

/// Writes one frame to a blocking writer.
pub fn write_message<W: std::io::Write>(w: &mut W, msg: &Message) -> std::io::Result<()> {
    w.write_all(&encode(msg))?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let msg = Message::Snapshot {
            generation: 7,
            tables: Box::default(),
        };
        let bytes = encode(&msg);
        let mut cursor = std::io::Cursor::new(bytes);
        assert_eq!(read_message(&mut cursor).unwrap(), msg);
    }

    #[test]
    fn pod_messages_round_trip() {
        let ip4: std::net::IpAddr = "10.244.1.5".parse().unwrap();
        let ip6: std::net::IpAddr = "fd00:10:244:1::5".parse().unwrap();
        for msg in [
            Message::AttachPod {
                ifname: "kxdp0123456789a".into(),
                container_id: "c1".into(),
                ips: vec![ip4, ip6],
            },
            Message::PodAttached {
                ifname: "kxdp0123456789a".into(),
            },
            Message::DetachPod {
                ifname: "kxdp0123456789a".into(),
                container_id: "c1".into(),
            },
            Message::PodDetached {
                ifname: "kxdp0123456789a".into(),
                found: false,
            },
        ] {
            let mut cursor = std::io::Cursor::new(encode(&msg));
            assert_eq!(read_message(&mut cursor).unwrap(), msg);
        }
        // The JSON the other side reads: the variant name, then snake_case fields.
        let json = serde_json::to_string(&Message::DetachPod {
            ifname: "kxdp0123456789a".into(),
            container_id: "c1".into(),
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"DetachPod":{"ifname":"kxdp0123456789a","container_id":"c1"}}"#
        );
    }

    #[test]
    fn other_version_is_refused() {
        let mut bytes = encode(&Message::Applied { generation: 1 });
        bytes[7] ^= 0xff;
        let header: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
        assert!(matches!(
            decode_header(&header),
            Err(WireError::Version { .. })
        ));
        let mut cursor = std::io::Cursor::new(bytes);
        assert!(read_message(&mut cursor).is_err());
    }

    #[test]
    fn bad_magic_and_oversize_are_refused() {
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(b"HTTP");
        assert!(matches!(
            decode_header(&header),
            Err(WireError::BadMagic(_))
        ));
        header[..4].copy_from_slice(MAGIC);
        header[4..8].copy_from_slice(&SPEC_VERSION.to_be_bytes());
        header[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_header(&header),
            Err(WireError::TooLarge(_))
        ));
    }
}
