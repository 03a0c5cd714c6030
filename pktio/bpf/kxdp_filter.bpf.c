// SPDX-License-Identifier: Apache-2.0
/*
 * kxdp's XDP program: steers to the AF_XDP socket of the receive queue (XSKMAP slot
 * rx_queue_index) only the frames kxdp serves, and hands everything else to the kernel
 * untouched (XDP_PASS), so the node's own traffic (SSH, the kubelet, DHCP, BGP) never
 * depends on kxdp running.
 *
 * Two steerings, chosen by kxdp_config.steering:
 *   STEER_REDIRECT_ALL  every frame goes to the socket (pod-facing ports: kxdp is the
 *                       pods' gateway, the kernel has nothing to do there);
 *   STEER_FILTER        only matches go to the socket (the uplink), where a match is
 *     - ARP whose target protocol address is in kxdp_owned;
 *     - IPv6 neighbour discovery (ICMPv6 133-137) about an address in kxdp_owned: the
 *       solicitation's target for 135, the IPv6 destination for the others;
 *     - IPv4 / IPv6 whose destination is in kxdp_prefix4 / kxdp_prefix6 (Service
 *       addresses as /32 and /128, pod networks);
 *     - UDP to kxdp_config.vxlan_port addressed to one of kxdp_nodes;
 *     - (destination, protocol, port) in kxdp_ports, or the port in the range kxdp_ranges
 *       holds for (destination, protocol): NodePorts, masquerade source ports. The "port"
 *       of ICMP is the echo identifier, matched for echo replies only, so a ping to the
 *       node still reaches the kernel;
 *     - an ICMP error (unreachable, time exceeded, parameter problem, too big) quoting a
 *       packet whose (source, protocol, source port) would match kxdp_ports or kxdp_ranges:
 *       the error is about a flow kxdp sent.
 * Anything not parsed (truncated headers, other EtherTypes, IPv4 fragments after the
 * first, IPv6 extension headers before the transport header) passes.
 *
 * A redirect to an empty XSKMAP slot falls back to XDP_PASS (bpf_redirect_map's flags).
 *
 * With kxdp_config.stamp set, every frame redirected to a socket gets 8 bytes in front of
 * its Ethernet header: the time the program saw it (bpf_ktime_get_ns, CLOCK_MONOTONIC, in
 * host order), which the sockets' reader strips (pktio's XskConfig::stamped) to tell how
 * long the frame waited in the receive ring. A prefix and not XDP metadata: this kernel
 * refuses bpf_xdp_adjust_meta to XDP programs. Frames passed to the kernel are never
 * touched; a frame with no headroom for the stamp (no driver gives less than 256 bytes)
 * is aborted (the xdp:xdp_exception tracepoint shows it) rather than sent unstamped.
 *
 * The key layouts are mirrored in pktio/src/xsk/filter.rs; change both together.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define STEER_FILTER 0
#define STEER_REDIRECT_ALL 1

#define FAMILY_V4 4
#define FAMILY_V6 6

/* Capacities: generous for a node (one /32 per Service address, one port entry per
 * NodePort and node address), small enough that a full map is a configuration error.
 * Every table is allocated per entry (BPF_F_NO_PREALLOC), so a program on a pod-facing
 * port, whose tables stay empty, costs a few pages, not the capacity. */
#define QUEUES_DEFAULT 64 /* replaced by the loader with the interface's queue count */
#define PREFIXES_MAX 65536
#define PORTS_MAX 16384
#define RANGES_MAX 256
#define OWNED_MAX 4096
#define NODES_MAX 64

/* Per-CPU decision counters, index = enum kxdp_counter (pktio FilterStats). */
enum kxdp_counter {
	C_PASSED = 0,
	C_REDIRECT_ALL,
	C_PREFIX,
	C_PORT,
	C_PORT_RANGE,
	C_VXLAN,
	C_ARP,
	C_NDP,
	C_ICMP_ERROR,
	C_COUNT,
};

struct kxdp_config {
	__u32 steering;
	/* Host byte order; 0: no VXLAN is redirected. */
	__u32 vxlan_port;
	/* Non-zero: every frame redirected to a socket is stamped (see the top). */
	__u32 stamp;
};

struct lpm4_key {
	__u32 prefixlen;
	__u8 addr[4];
};

struct lpm6_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* An address of either family: IPv4 in addr[0..4], the rest zero. */
struct addr_key {
	__u8 addr[16];
	__u8 family;
	__u8 pad[3];
};

struct port_key {
	__u8 addr[16];
	__u8 family;
	__u8 proto;
	/* Network byte order, as on the wire. */
	__u8 port[2];
};

struct range_key {
	__u8 addr[16];
	__u8 family;
	__u8 proto;
	__u8 pad[2];
};

/* Inclusive, host byte order. */
struct port_range {
	__u16 first;
	__u16 last;
};

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, QUEUES_DEFAULT);
	__type(key, __u32);
	__type(value, __u32);
} kxdp_xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kxdp_config);
} kxdp_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, PREFIXES_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm4_key);
	__type(value, __u8);
} kxdp_prefix4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, PREFIXES_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm6_key);
	__type(value, __u8);
} kxdp_prefix6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PORTS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct port_key);
	__type(value, __u8);
} kxdp_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RANGES_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct range_key);
	__type(value, struct port_range);
} kxdp_ranges SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, OWNED_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct addr_key);
	__type(value, __u8);
} kxdp_owned SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NODES_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct addr_key);
	__type(value, __u8);
} kxdp_nodes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, C_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} kxdp_stats SEC(".maps");

/* ARP for Ethernet and IPv4 (RFC 826). */
struct arp_eth_ipv4 {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[6];
	__u8 spa[4];
	__u8 tha[6];
	__u8 tpa[4];
} __attribute__((packed));

#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ICMP_ECHO 8
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PARAMPROB 4
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129
#define NDISC_FIRST 133 /* router solicitation */
#define NDISC_NEIGHBOUR_SOLICITATION 135
#define NDISC_LAST 137 /* redirect */
#define IPV4_FRAG_OFFSET 0x1fff
#define IPV6_HDR_LEN 40

static __always_inline void count(__u32 counter)
{
	__u64 *n = bpf_map_lookup_elem(&kxdp_stats, &counter);

	if (n)
		*n += 1;
}

static __always_inline int pass(void)
{
	count(C_PASSED);
	return XDP_PASS;
}

static __always_inline int redirect(struct xdp_md *ctx, __u32 counter)
{
	__u32 zero = 0;
	const struct kxdp_config *cfg;
	__u64 *stamp;
	int action = bpf_redirect_map(&kxdp_xsks, ctx->rx_queue_index, XDP_PASS);

	count(counter);
	if (action != XDP_REDIRECT)
		return action;
	cfg = bpf_map_lookup_elem(&kxdp_config, &zero);
	if (!cfg || !cfg->stamp)
		return action;
	/* The redirect happens after the program returns, with the frame as it is then. */
	if (bpf_xdp_adjust_head(ctx, -(int)sizeof(__u64)))
		return XDP_ABORTED;
	stamp = (__u64 *)(long)ctx->data;
	if ((const void *)(stamp + 1) > (const void *)(long)ctx->data_end)
		return XDP_ABORTED;
	*stamp = bpf_ktime_get_ns();
	return action;
}

static __always_inline int is_owned(const __u8 *addr, __u8 family)
{
	struct addr_key k = {};

	__builtin_memcpy(k.addr, addr, family == FAMILY_V4 ? 4 : 16);
	k.family = family;
	return bpf_map_lookup_elem(&kxdp_owned, &k) != 0;
}

/* Whether (addr, proto, port) is one of kxdp's ports: C_PORT for an exact entry,
 * C_PORT_RANGE inside a range, 0 for neither. `port` is in host order. */
static __always_inline __u32 is_kxdp_port(const struct addr_key *addr, __u8 proto, __u16 port)
{
	struct port_key pk = {};
	struct range_key rk = {};
	struct port_range *r;

	__builtin_memcpy(pk.addr, addr->addr, 16);
	pk.family = addr->family;
	pk.proto = proto;
	pk.port[0] = port >> 8;
	pk.port[1] = port & 0xff;
	if (bpf_map_lookup_elem(&kxdp_ports, &pk))
		return C_PORT;
	__builtin_memcpy(rk.addr, addr->addr, 16);
	rk.family = addr->family;
	rk.proto = proto;
	r = bpf_map_lookup_elem(&kxdp_ranges, &rk);
	return r && port >= r->first && port <= r->last ? C_PORT_RANGE : 0;
}

static __always_inline __u16 be16_at(const __u8 *p)
{
	return (__u16)p[0] << 8 | p[1];
}

/* The quoted packet of an ICMP error starts at `inner`: kxdp sent it if its (source,
 * protocol, source port) is one of kxdp's ports. */
static __always_inline int quoted_is_kxdp(const __u8 *inner, const void *end, __u8 family)
{
	struct addr_key src = {};
	const __u8 *l4;
	__u8 proto;

	if (family == FAMILY_V4) {
		if ((const void *)(inner + 20) > end)
			return 0;
		__u8 ihl = inner[0] & 0x0f;

		if (ihl < 5)
			return 0;
		__builtin_memcpy(src.addr, inner + 12, 4);
		proto = inner[9];
		l4 = inner + ihl * 4;
	} else {
		if ((const void *)(inner + IPV6_HDR_LEN) > end)
			return 0;
		__builtin_memcpy(src.addr, inner + 8, 16);
		proto = inner[6];
		l4 = inner + IPV6_HDR_LEN;
	}
	src.family = family;
	/* A quoted header may be cut short; the source port is in the first 2 bytes and the
	 * echo identifier at 4. */
	if ((const void *)(l4 + 8) > end)
		return 0;
	switch (proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		return is_kxdp_port(&src, proto, be16_at(l4)) != 0;
	case IPPROTO_ICMP:
		return family == FAMILY_V4 && l4[0] == ICMP_ECHO &&
		       is_kxdp_port(&src, proto, be16_at(l4 + 4)) != 0;
	case IPPROTO_ICMPV6:
		return family == FAMILY_V6 && l4[0] == ICMPV6_ECHO_REQUEST &&
		       is_kxdp_port(&src, proto, be16_at(l4 + 4)) != 0;
	}
	return 0;
}

/* The transport rules for a packet to `dst` whose transport header starts at `l4`. */
static __always_inline int by_transport(struct xdp_md *ctx, const struct addr_key *dst,
					__u8 proto, const __u8 *l4, const void *end,
					const struct kxdp_config *cfg)
{
	__u32 counter;
	__u16 port;

	switch (proto) {
	case IPPROTO_TCP:
	case IPPROTO_SCTP:
		if ((const void *)(l4 + 4) > end)
			return pass();
		port = be16_at(l4 + 2);
		break;
	case IPPROTO_UDP:
		if ((const void *)(l4 + 4) > end)
			return pass();
		port = be16_at(l4 + 2);
		if (cfg->vxlan_port != 0 && port == cfg->vxlan_port &&
		    bpf_map_lookup_elem(&kxdp_nodes, dst))
			return redirect(ctx, C_VXLAN);
		break;
	case IPPROTO_ICMP:
		if (dst->family != FAMILY_V4 || (const void *)(l4 + 8) > end)
			return pass();
		if (l4[0] == ICMP_ECHOREPLY) {
			port = be16_at(l4 + 4);
			break;
		}
		if ((l4[0] == ICMP_DEST_UNREACH || l4[0] == ICMP_TIME_EXCEEDED ||
		     l4[0] == ICMP_PARAMETERPROB) &&
		    quoted_is_kxdp(l4 + 8, end, FAMILY_V4))
			return redirect(ctx, C_ICMP_ERROR);
		return pass();
	case IPPROTO_ICMPV6:
		if (dst->family != FAMILY_V6 || (const void *)(l4 + 8) > end)
			return pass();
		if (l4[0] == ICMPV6_ECHO_REPLY) {
			port = be16_at(l4 + 4);
			break;
		}
		if (l4[0] >= ICMPV6_DEST_UNREACH && l4[0] <= ICMPV6_PARAMPROB &&
		    quoted_is_kxdp(l4 + 8, end, FAMILY_V6))
			return redirect(ctx, C_ICMP_ERROR);
		return pass();
	default:
		return pass();
	}
	counter = is_kxdp_port(dst, proto, port);
	if (counter)
		return redirect(ctx, counter);
	return pass();
}

static __always_inline int arp(struct xdp_md *ctx, const void *l3, const void *end)
{
	const struct arp_eth_ipv4 *a = l3;

	if ((const void *)(a + 1) > end)
		return pass();
	if (a->htype != bpf_htons(1) || a->ptype != bpf_htons(ETH_P_IP) || a->hlen != 6 ||
	    a->plen != 4)
		return pass();
	if (is_owned(a->tpa, FAMILY_V4))
		return redirect(ctx, C_ARP);
	return pass();
}

static __always_inline int ipv4(struct xdp_md *ctx, const __u8 *ip, const void *end,
				const struct kxdp_config *cfg)
{
	struct lpm4_key lk = { .prefixlen = 32 };
	struct addr_key dst = {};
	__u8 ihl;

	if ((const void *)(ip + 20) > end)
		return pass();
	ihl = ip[0] & 0x0f;
	if (ip[0] >> 4 != 4 || ihl < 5)
		return pass();
	__builtin_memcpy(lk.addr, ip + 16, 4);
	if (bpf_map_lookup_elem(&kxdp_prefix4, &lk))
		return redirect(ctx, C_PREFIX);
	/* A fragment after the first carries no transport header. */
	if (be16_at(ip + 6) & IPV4_FRAG_OFFSET)
		return pass();
	__builtin_memcpy(dst.addr, ip + 16, 4);
	dst.family = FAMILY_V4;
	return by_transport(ctx, &dst, ip[9], ip + ihl * 4, end, cfg);
}

static __always_inline int ipv6(struct xdp_md *ctx, const __u8 *ip, const void *end,
				const struct kxdp_config *cfg)
{
	struct lpm6_key lk = { .prefixlen = 128 };
	struct addr_key dst = {};
	const __u8 *l4 = ip + IPV6_HDR_LEN;
	__u8 next;

	if ((const void *)l4 > end)
		return pass();
	if (ip[0] >> 4 != 6)
		return pass();
	next = ip[6];
	if (next == IPPROTO_ICMPV6 && (const void *)(l4 + 8) <= end && l4[0] >= NDISC_FIRST &&
	    l4[0] <= NDISC_LAST) {
		/* A solicitation asks about its target; the rest concern their destination
		 * (an advertisement answering kxdp is sent to kxdp's address). */
		const __u8 *about = ip + 24;

		if (l4[0] == NDISC_NEIGHBOUR_SOLICITATION) {
			if ((const void *)(l4 + 24) > end)
				return pass();
			about = l4 + 8;
		}
		if (is_owned(about, FAMILY_V6))
			return redirect(ctx, C_NDP);
	}
	__builtin_memcpy(lk.addr, ip + 24, 16);
	if (bpf_map_lookup_elem(&kxdp_prefix6, &lk))
		return redirect(ctx, C_PREFIX);
	__builtin_memcpy(dst.addr, ip + 24, 16);
	dst.family = FAMILY_V6;
	return by_transport(ctx, &dst, next, l4, end, cfg);
}

SEC("xdp")
int kxdp_filter(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct kxdp_config *cfg = bpf_map_lookup_elem(&kxdp_config, &zero);
	const void *data, *end;
	const struct ethhdr *eth;

	if (!cfg)
		return pass();
	data = (const void *)(long)ctx->data;
	end = (const void *)(long)ctx->data_end;
	eth = data;
	if (cfg->steering == STEER_REDIRECT_ALL)
		return redirect(ctx, C_REDIRECT_ALL);
	if ((const void *)(eth + 1) > end)
		return pass();
	switch (eth->h_proto) {
	case bpf_htons(ETH_P_ARP):
		return arp(ctx, eth + 1, end);
	case bpf_htons(ETH_P_IP):
		return ipv4(ctx, (const __u8 *)(eth + 1), end, cfg);
	case bpf_htons(ETH_P_IPV6):
		return ipv6(ctx, (const __u8 *)(eth + 1), end, cfg);
	}
	return pass();
}

/* The project's licence; no GPL-only helper is called. */
char LICENSE[] SEC("license") = "Apache-2.0";
