//! A blocking route-netlink client for the few requests kxdp makes of the kernel: create a
//! veth pair, look links up, bring them up, set a link's IPv4 settings, add addresses, add,
//! replace and delete routes, delete a link. Messages are `netlink-packet-route`'s; the socket is a plain one, opened
//! in whatever network namespace the calling thread is in.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use ipnet::IpNet;
use netlink_packet_core::{
    DefaultNla, Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLA_F_NESTED, NLM_F_ACK,
    NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    AfSpecInet, AfSpecUnspec, InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// What kxdp reads of a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// MAC, `aa:bb:cc:dd:ee:ff` (empty without one).
    pub mac: String,
    /// MTU.
    pub mtu: u32,
    /// Alias (`ip link set ... alias`), empty if none.
    pub alias: String,
    /// The `kind` of its link info (`veth`), if any.
    pub kind: Option<String>,
    /// Administratively up.
    pub up: bool,
    /// A veth's peer (`IFLA_LINK`), when the peer is in this namespace.
    pub peer: Option<u32>,
    /// Receive queues it was created with.
    pub rx_queues: u32,
}

/// A route of the main table, as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    /// Destination.
    pub dst: IpNet,
    /// Next hop.
    pub gw: Option<IpAddr>,
    /// Outgoing interface.
    pub oif: Option<u32>,
    /// Preferred source address (`src`).
    pub src: Option<IpAddr>,
    /// Who added it (`RTPROT_*`: 2 the kernel, 3 boot, 4 static, ...).
    pub protocol: u8,
}

/// `RTPROT_KERNEL`: routes the kernel adds itself (a link's prefix routes).
pub const RTPROT_KERNEL: u8 = 2;
/// `RTPROT_STATIC`: routes an administrator (here: kxdp) added.
pub const RTPROT_STATIC: u8 = 4;

/// A per-interface IPv4 setting (`net.ipv4.conf.<if>.<name>`), numbered as `linux/ip.h`'s
/// `IPV4_DEVCONF_*` (1-based), which is how route netlink addresses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv4DevConf {
    /// `rp_filter`: reverse-path filtering, 0 off, 1 strict, 2 loose.
    RpFilter,
    /// `accept_local`: accept packets with a local source address.
    AcceptLocal,
}

impl Ipv4DevConf {
    /// Its `IPV4_DEVCONF_*` number.
    pub fn index(self) -> u16 {
        match self {
            Ipv4DevConf::RpFilter => 8,
            Ipv4DevConf::AcceptLocal => 23,
        }
    }

    /// Its name under `/proc/sys/net/ipv4/conf/<if>/`.
    pub fn name(self) -> &'static str {
        match self {
            Ipv4DevConf::RpFilter => "rp_filter",
            Ipv4DevConf::AcceptLocal => "accept_local",
        }
    }
}

/// `IFLA_INET_CONF` (`linux/if_link.h`): in `IFLA_AF_SPEC`'s `AF_INET`, the link's IPv4
/// settings.
const IFLA_INET_CONF: u16 = 1;

/// The `RTM_SETLINK` that sets `settings` on link `index` and nothing else:
/// `IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF { <IPV4_DEVCONF_*>: u32, ... } } }`. The kernel
/// (`inet_set_link_af`, net/ipv4/devinet.c) sets each nested attribute by its type, so the
/// settings not named keep their values. Built by hand because the crate's
/// `AfSpecInet::DevConfRequest` leaves out every zero, and a zero (`rp_filter=0`) is a value
/// one may want to set.
fn ipv4_conf_message(index: u32, settings: &[(Ipv4DevConf, u32)]) -> LinkMessage {
    let nested: Vec<DefaultNla> = settings
        .iter()
        .map(|(conf, value)| DefaultNla::new(conf.index(), value.to_ne_bytes().to_vec()))
        .collect();
    let mut conf = vec![0; nested.as_slice().buffer_len()];
    nested.as_slice().emit(&mut conf);
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.attributes
        .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![
            AfSpecInet::Other(DefaultNla::new(IFLA_INET_CONF | NLA_F_NESTED, conf)),
        ])]));
    msg
}

/// A route-netlink socket in the namespace it was opened in.
pub struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink { socket, seq: 0 })
    }

    /// Sends `msg` and returns the answers: every message of a dump, or nothing for an
    /// acknowledged change. A kernel error becomes the `io::Error` of its errno.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut out = Vec::new();
        loop {
            let (bytes, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < bytes.len() {
                let reply: NetlinkMessage<RouteNetlinkMessage> =
                    NetlinkMessage::deserialize(&bytes[offset..])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if reply.header.sequence_number != self.seq {
                    // A late answer to an earlier request: not ours to read.
                    offset += len.max(1);
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(out),
                        Some(_) => return Err(e.to_io()),
                    },
                    NetlinkPayload::InnerMessage(m) => {
                        out.push(m);
                        if flags & NLM_F_DUMP != NLM_F_DUMP && flags & NLM_F_ACK == 0 {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }

    /// Creates the veth pair `host` (here) and `peer` (created directly in the namespace
    /// `peer_netns`), both with `mtu` and `queues` RX and TX queues. Fails with `EEXIST`
    /// if either name is taken on its side.
    pub fn create_veth(
        &mut self,
        host: &str,
        peer: &str,
        peer_netns: BorrowedFd<'_>,
        mtu: u32,
        queues: u32,
    ) -> io::Result<()> {
        self.new_veth(host, peer, Some(peer_netns), Some(mtu), queues)
    }

    /// Creates the veth pair `a`/`b`, both here, with the kernel's default MTU and
    /// `queues` RX and TX queues each. Fails with `EEXIST` if either name is taken.
    pub fn create_veth_here(&mut self, a: &str, b: &str, queues: u32) -> io::Result<()> {
        self.new_veth(a, b, None, None, queues)
    }

    fn new_veth(
        &mut self,
        host: &str,
        peer: &str,
        peer_netns: Option<BorrowedFd<'_>>,
        mtu: Option<u32>,
        queues: u32,
    ) -> io::Result<()> {
        let mut peer_msg = LinkMessage::default();
        peer_msg.attributes = vec![
            LinkAttribute::IfName(peer.to_string()),
            LinkAttribute::NumTxQueues(queues),
            LinkAttribute::NumRxQueues(queues),
        ];
        let mut msg = LinkMessage::default();
        msg.attributes = vec![
            LinkAttribute::IfName(host.to_string()),
            LinkAttribute::NumTxQueues(queues),
            LinkAttribute::NumRxQueues(queues),
        ];
        if let Some(mtu) = mtu {
            peer_msg.attributes.push(LinkAttribute::Mtu(mtu));
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(ns) = peer_netns {
            peer_msg
                .attributes
                .push(LinkAttribute::NetNsFd(ns.as_raw_fd()));
        }
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]));
        self.request(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Sets a link up and, if given, its alias.
    pub fn set_up(&mut self, index: u32, alias: Option<&str>) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        if let Some(alias) = alias {
            msg.attributes
                .push(LinkAttribute::IfAlias(alias.to_string()));
        }
        self.request(RouteNetlinkMessage::SetLink(msg), NLM_F_ACK)
            .map(drop)
    }

    /// Sets link `index`'s IPv4 `settings` (as `sysctl net.ipv4.conf.<if>.<name>=<value>`
    /// would) through route netlink: it needs `CAP_NET_ADMIN` only, not a writable
    /// `/proc/sys`, which a container that is not privileged does not have. `ENODEV` if
    /// there is no such link; `EAFNOSUPPORT` if it has no IPv4 (an MTU below 68); `EINVAL`
    /// or `ERANGE` for a value the kernel refuses.
    pub fn set_ipv4_conf(&mut self, index: u32, settings: &[(Ipv4DevConf, u32)]) -> io::Result<()> {
        self.request(
            RouteNetlinkMessage::SetLink(ipv4_conf_message(index, settings)),
            NLM_F_ACK,
        )
        .map(drop)
    }

    /// The link named `name`, if there is one.
    pub fn link_by_name(&mut self, name: &str) -> io::Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(answers) => Ok(answers.into_iter().find_map(link_of)),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every link.
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let answers = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers.into_iter().filter_map(link_of).collect())
    }

    /// Deletes link `index` (and, for a veth, its peer with it). `ENODEV` if it is gone.
    pub fn delete_link(&mut self, index: u32) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(msg), NLM_F_ACK)
            .map(drop)
    }

    /// Adds `addr` to link `index`. IPv6 addresses skip duplicate address detection: the
    /// dataplane answers neighbour solicitations on a pod's port for every address but the
    /// asker's, DAD's probe (sent from `::`) included, which would mark the pod's own
    /// address a duplicate.
    pub fn add_address(&mut self, index: u32, addr: IpNet) -> io::Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.index = index;
        msg.header.prefix_len = addr.prefix_len();
        msg.header.family = family(addr.addr());
        msg.attributes.push(AddressAttribute::Local(addr.addr()));
        msg.attributes.push(AddressAttribute::Address(addr.addr()));
        if addr.addr().is_ipv6() {
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Puts `addr` on link `index` with `scope` (link or universe), or leaves it there if
    /// it is already: idempotent, for set-up that may run again over its own leftovers.
    pub fn replace_address(&mut self, index: u32, addr: IpNet, link_scope: bool) -> io::Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.index = index;
        msg.header.prefix_len = addr.prefix_len();
        msg.header.family = family(addr.addr());
        msg.header.scope = if link_scope {
            AddressScope::Link
        } else {
            AddressScope::Universe
        };
        msg.attributes.push(AddressAttribute::Local(addr.addr()));
        msg.attributes.push(AddressAttribute::Address(addr.addr()));
        if addr.addr().is_ipv6() {
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// The addresses of link `index`.
    pub fn addresses(&mut self, index: u32) -> io::Result<Vec<IpNet>> {
        let answers = self.request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    let ip = a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })?;
                    IpNet::new(ip, a.header.prefix_len).ok()
                }
                _ => None,
            })
            .collect())
    }

    /// Adds a route to `dst` out of link `oif`, via `gw` if given. `onlink` tells the
    /// kernel the gateway is reachable on the link whatever the link's addresses say.
    pub fn add_route(
        &mut self,
        dst: IpNet,
        gw: Option<IpAddr>,
        oif: u32,
        onlink: bool,
    ) -> io::Result<()> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(dst.addr());
        msg.header.destination_prefix_length = dst.prefix_len();
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = if gw.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        msg.header.kind = RouteType::Unicast;
        if onlink {
            msg.header.flags = RouteFlags::Onlink;
        }
        if dst.prefix_len() > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(route_address(dst.addr())));
        }
        if let Some(gw) = gw {
            msg.attributes
                .push(RouteAttribute::Gateway(route_address(gw)));
        }
        msg.attributes.push(RouteAttribute::Oif(oif));
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Routes `dst` straight out of link `oif` (no gateway, link scope), with `src` as the
    /// preferred source if given, replacing a route to `dst` that is there: `ip route
    /// replace DST dev OIF [src SRC] proto static`.
    pub fn replace_route(&mut self, dst: IpNet, oif: u32, src: Option<IpAddr>) -> io::Result<()> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(dst.addr());
        msg.header.destination_prefix_length = dst.prefix_len();
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Static;
        msg.header.scope = RouteScope::Link;
        msg.header.kind = RouteType::Unicast;
        if dst.prefix_len() > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(route_address(dst.addr())));
        }
        if let Some(src) = src {
            msg.attributes
                .push(RouteAttribute::PrefSource(route_address(src)));
        }
        msg.attributes.push(RouteAttribute::Oif(oif));
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// Deletes the main table's route to `dst` out of link `oif`. `ESRCH` if there is none.
    pub fn delete_route(&mut self, dst: IpNet, oif: u32) -> io::Result<()> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family(dst.addr());
        msg.header.destination_prefix_length = dst.prefix_len();
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.scope = RouteScope::NoWhere;
        if dst.prefix_len() > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(route_address(dst.addr())));
        }
        msg.attributes.push(RouteAttribute::Oif(oif));
        self.request(RouteNetlinkMessage::DelRoute(msg), NLM_F_ACK)
            .map(drop)
    }

    /// The main table's routes of one family.
    pub fn routes(&mut self, v6: bool) -> io::Result<Vec<RouteEntry>> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let answers = self.request(RouteNetlinkMessage::GetRoute(msg), NLM_F_DUMP)?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => route_of(&r),
                _ => None,
            })
            .collect())
    }
}

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn route_of(r: &RouteMessage) -> Option<RouteEntry> {
    let table = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let unspecified = match r.header.address_family {
        AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    };
    let mut dst = unspecified;
    let mut gw = None;
    let mut oif = None;
    let mut src = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = ip_of(d).unwrap_or(unspecified),
            RouteAttribute::Gateway(g) => gw = ip_of(g),
            RouteAttribute::Oif(o) => oif = Some(*o),
            RouteAttribute::PrefSource(s) => src = ip_of(s),
            _ => {}
        }
    }
    Some(RouteEntry {
        dst: IpNet::new(dst, r.header.destination_prefix_length).ok()?,
        gw,
        oif,
        src,
        protocol: u8::from(r.header.protocol),
    })
}

fn link_of(m: RouteNetlinkMessage) -> Option<Link> {
    let RouteNetlinkMessage::NewLink(l) = m else {
        return None;
    };
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        mac: String::new(),
        mtu: 0,
        alias: String::new(),
        kind: None,
        up: l.header.flags.contains(LinkFlags::Up),
        peer: None,
        rx_queues: 0,
    };
    let mut peer_elsewhere = false;
    for a in l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(mac) => link.mac = format_mac(&mac),
            LinkAttribute::Mtu(m) => link.mtu = m,
            LinkAttribute::IfAlias(a) => link.alias = a,
            LinkAttribute::Link(peer) => link.peer = Some(peer),
            LinkAttribute::LinkNetNsId(_) => peer_elsewhere = true,
            LinkAttribute::NumRxQueues(q) => link.rx_queues = q,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        link.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    if peer_elsewhere {
        link.peer = None;
    }
    Some(link)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_settings_are_sent_one_nested_attribute_each_zeros_included() {
        let msg = ipv4_conf_message(
            7,
            &[(Ipv4DevConf::AcceptLocal, 1), (Ipv4DevConf::RpFilter, 0)],
        );
        assert_eq!(msg.header.index, 7);
        let mut bytes = vec![0; msg.buffer_len()];
        msg.emit(&mut bytes);
        // After the 16-byte ifinfomsg: one attribute, nested three deep; each header is
        // (length, type) in host order.
        let header = |len: u16, kind: u16| [len.to_ne_bytes(), kind.to_ne_bytes()].concat();
        let mut want: Vec<u8> = Vec::new();
        want.extend(header(28, 26)); // IFLA_AF_SPEC
        want.extend(header(24, 2)); // AF_INET
        want.extend(header(20, 1 | 0x8000)); // IFLA_INET_CONF, NLA_F_NESTED: 4 + 2 * 8
        want.extend(header(8, 23)); // IPV4_DEVCONF_ACCEPT_LOCAL
        want.extend(1u32.to_ne_bytes());
        want.extend(header(8, 8)); // IPV4_DEVCONF_RP_FILTER
        want.extend(0u32.to_ne_bytes());
        assert_eq!(&bytes[16..], &want[..]);
    }
}
