// SPDX-License-Identifier: Apache-2.0
/*
 * kxdp's host redirect: a tc (tcx) egress program for the node's own interfaces, so that
 * host processes reach the Service frontends the kernel would otherwise keep for itself.
 *
 * A host process that connects to a NodePort on one of the node's own addresses is routed
 * by its kernel to `lo`: the address is local, so the packet never leaves the kernel and
 * kxdp never sees it (kube-proxy translates such packets in the OUTPUT chain). A connection
 * to a LoadBalancer IP or an external IP leaves through the uplink towards a router. On
 * the egress of those interfaces this program takes the packets whose (destination,
 * protocol, destination port) is in kxdp_host_ports, writes the Ethernet header of the
 * host veth pair (from the kernel's end to kxdp's end) and redirects them to the kernel's
 * end of that pair, whose peer kxdp serves; everything else goes on untouched (TC_ACT_OK).
 *
 * The redirect goes through the pair's transmit path, so a TSO/GSO super-packet from a
 * local socket is segmented, and a partial checksum completed, for the pair (which has
 * those offloads off) before kxdp sees it. kxdp's answers come back into the kernel
 * through the same pair; with a source that is one of the node's own addresses, so the
 * kernel's end needs accept_local (see the README's operations section).
 *
 * The program hangs on a tcx link owned by kxdp-dataplane: when the process dies the link
 * and the program go, and host traffic flows as if kxdp had never been there.
 *
 * The key layout is that of kxdp_filter.bpf.c's kxdp_ports (pktio/src/xsk/filter.rs).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define FAMILY_V4 4
#define FAMILY_V6 6
#define HOST_PORTS_MAX 16384
#define IPV4_FRAG_OFFSET 0x1fff
#define IPV6_HDR_LEN 40

struct host_config {
	/* The kernel's end of the host veth pair; 0: redirect nothing. */
	__u32 ifindex;
	/* Destination (kxdp's end) and source (the kernel's end) MACs. */
	__u8 dst_mac[6];
	__u8 src_mac[6];
};

struct port_key {
	__u8 addr[16];
	__u8 family;
	__u8 proto;
	/* Network byte order, as on the wire. */
	__u8 port[2];
};

/* Per-CPU counters, index = enum host_counter (pktio HostRedirectStats). */
enum host_counter {
	H_PASSED = 0,
	H_REDIRECTED,
	H_COUNT,
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct host_config);
} kxdp_host_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, HOST_PORTS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct port_key);
	__type(value, __u8);
} kxdp_host_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, H_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} kxdp_host_stats SEC(".maps");

static __always_inline void count(__u32 counter)
{
	__u64 *n = bpf_map_lookup_elem(&kxdp_host_stats, &counter);

	if (n)
		*n += 1;
}

static __always_inline int pass(void)
{
	count(H_PASSED);
	return TC_ACT_OK;
}

SEC("tc")
int kxdp_host_redirect(struct __sk_buff *skb)
{
	const __u8 *data = (const __u8 *)(long)skb->data;
	const void *end = (const void *)(long)skb->data_end;
	const struct ethhdr *eth = (const void *)data;
	struct port_key k = {};
	struct host_config *cfg;
	const __u8 *l4;
	__u32 zero = 0;

	if ((const void *)(eth + 1) > end)
		return pass();
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		const __u8 *ip = data + sizeof(*eth);
		__u8 ihl;

		if ((const void *)(ip + 20) > end)
			return pass();
		ihl = ip[0] & 0x0f;
		if (ihl < 5 || (((__u16)ip[6] << 8 | ip[7]) & IPV4_FRAG_OFFSET))
			return pass();
		__builtin_memcpy(k.addr, ip + 16, 4);
		k.family = FAMILY_V4;
		k.proto = ip[9];
		l4 = ip + ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		const __u8 *ip = data + sizeof(*eth);

		if ((const void *)(ip + IPV6_HDR_LEN) > end)
			return pass();
		__builtin_memcpy(k.addr, ip + 24, 16);
		k.family = FAMILY_V6;
		k.proto = ip[6];
		l4 = ip + IPV6_HDR_LEN;
	} else {
		return pass();
	}
	if (k.proto != IPPROTO_TCP && k.proto != IPPROTO_UDP && k.proto != IPPROTO_SCTP)
		return pass();
	if ((const void *)(l4 + 4) > end)
		return pass();
	k.port[0] = l4[2];
	k.port[1] = l4[3];
	if (!bpf_map_lookup_elem(&kxdp_host_ports, &k))
		return pass();
	cfg = bpf_map_lookup_elem(&kxdp_host_config, &zero);
	if (!cfg || cfg->ifindex == 0)
		return pass();
	if (bpf_skb_store_bytes(skb, 0, cfg->dst_mac, 6, 0) ||
	    bpf_skb_store_bytes(skb, 6, cfg->src_mac, 6, 0))
		return pass();
	count(H_REDIRECTED);
	return bpf_redirect(cfg->ifindex, 0);
}

/* The project's licence; no GPL-only helper is called. */
char LICENSE[] SEC("license") = "Apache-2.0";
