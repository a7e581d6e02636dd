// SPDX-License-Identifier: GPL-2.0
//
// ferry's per-host data plane (docs/design.md#tc-programs): four TC programs, one object per host.
//
//   machine_in   TC ingress on the host side of a machine veth (packets *from* the machine):
//                anti-spoofing, org isolation, destination to infra form when it is remote.
//   machine_out  TC egress on the same veth (packets *to* the machine): source back to guest
//                form, and the header quoted inside ICMPv6 errors back to guest form.
//   fabric_out   TC egress on the fabric link: source to infra form.
//   fabric_in    TC ingress on the fabric link: only infra-form traffic for this host, isolation
//                again, destination back to guest form.
//
// Why the swap is split (destination before routing, source after it): a host that generates an
// ICMPv6 error (Packet Too Big, Time Exceeded) for a forwarded packet addresses it to the packet's
// source as the host sees it. Keeping that source routable on every host (guest form on the
// sender's host, infra form everywhere else) is what lets such errors reach the sending machine;
// the quoted header is then put back into guest form on the last hop, so the machine's kernel
// matches it to its socket and path-MTU discovery and traceroute work.
//
// Every rewrite permutes 16-bit words inside one address, which keeps the one's-complement sum
// and therefore every TCP/UDP/ICMPv6 checksum: no checksum fix-up anywhere.
//
// Each program is attached (as a TCX link) only where it belongs, so none of them has to find out
// what its interface is. Only machine_in needs per-interface facts (the machine's network, host
// and field, for anti-spoofing and isolation): they live in the `ferry_ifaces` map keyed by
// ifindex. The fabric programs only need this host's ID, which the loader sets as a constant when
// it loads the object for its host (one load per host), so the packets crossing the fabric pay no
// map lookup for it; machine_out needs no per-interface fact at all. A hash lookup per program
// was ~1% of a TCP stream's CPU (BENCHMARKS.md, issue 17 item 3).

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define IFACE_MACHINE 1

#define FLEET_PREFIX 0xfdaa
#define HOST_MIN 0x80000000u

// Drop and rewrite counters, indexed by these (read by tests and `ferry dev`).
enum stat {
	STAT_SPOOFED_SRC = 0,
	STAT_OTHER_NETWORK = 1,
	STAT_NOT_FLEET = 2,
	STAT_BAD_DST = 3,
	STAT_FABRIC_BAD_DST = 4,
	STAT_FABRIC_BAD_SRC = 5,
	STAT_NON_IPV6 = 6,
	STAT_SWAPPED_OUT = 7,
	STAT_SWAPPED_IN = 8,
	STAT_ICMP_INNER = 9,
	STAT_MAX = 16,
};

// This host's ID, set by the loader (`Dataplane::load`) before the object is loaded.
const volatile __u32 this_host = 0;

struct iface_cfg {
	__u32 kind;
	__u32 net;     // machine veth: the machine's network ID
	__u32 host;    // this host's ID
	__u32 machine; // machine veth: the machine's field
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct iface_cfg);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ferry_stats SEC(".maps");

static __always_inline void count(__u32 what)
{
	__u64 *v = bpf_map_lookup_elem(&ferry_stats, &what);
	if (v)
		*v += 1;
}

static __always_inline int drop(__u32 why)
{
	count(why);
	return TC_ACT_SHOT;
}

// 16-bit words of an address, host order.
static __always_inline __u16 w(const struct in6_addr *a, int i)
{
	return bpf_ntohs(a->in6_u.u6_addr16[i]);
}

// The 32-bit field in words i, i+1.
static __always_inline __u32 pair(const struct in6_addr *a, int i)
{
	return ((__u32)w(a, i) << 16) | w(a, i + 1);
}

static __always_inline int is_fleet(const struct in6_addr *a)
{
	return w(a, 0) == FLEET_PREFIX;
}

// Swap words 1-2 with 3-4 in place.
static __always_inline void swap_fields(struct in6_addr *a)
{
	__u16 w1 = a->in6_u.u6_addr16[1], w2 = a->in6_u.u6_addr16[2];
	a->in6_u.u6_addr16[1] = a->in6_u.u6_addr16[3];
	a->in6_u.u6_addr16[2] = a->in6_u.u6_addr16[4];
	a->in6_u.u6_addr16[3] = w1;
	a->in6_u.u6_addr16[4] = w2;
}

static __always_inline int is_link_scope(const struct in6_addr *a)
{
	__u16 w0 = w(a, 0);
	return (w0 & 0xffc0) == 0xfe80 || (w0 & 0xff00) == 0xff00; // link-local or multicast
}

static __always_inline int is_unspecified(const struct in6_addr *a)
{
	return (a->in6_u.u6_addr32[0] | a->in6_u.u6_addr32[1] | a->in6_u.u6_addr32[2] |
		a->in6_u.u6_addr32[3]) == 0;
}

// Infra form for a remote host: first pair is a host ID, second a network ID.
static __always_inline int is_infra(const struct in6_addr *a)
{
	return is_fleet(a) && pair(a, 1) >= HOST_MIN && pair(a, 3) < HOST_MIN && pair(a, 3) != 0;
}

static __always_inline int is_guest(const struct in6_addr *a)
{
	return is_fleet(a) && pair(a, 1) < HOST_MIN && pair(a, 1) != 0 && pair(a, 3) >= HOST_MIN;
}

static __always_inline struct ipv6hdr *ipv6_of(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return 0;
	if (eth->h_proto != bpf_htons(ETH_P_IPV6))
		return 0;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	if ((void *)(ip6 + 1) > end)
		return 0;
	return ip6;
}

// Makes sure the Ethernet and IPv6 headers are in the linear part, then returns them.
static __always_inline struct ipv6hdr *ipv6_pull(struct __sk_buff *skb)
{
	struct ipv6hdr *ip6 = ipv6_of(skb);
	if (ip6)
		return ip6;
	if (skb->protocol != bpf_htons(ETH_P_IPV6))
		return 0;
	if (bpf_skb_pull_data(skb, sizeof(struct ethhdr) + sizeof(struct ipv6hdr)))
		return 0;
	return ipv6_of(skb);
}

SEC("classifier/machine_in")
int machine_in(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct iface_cfg *cfg = bpf_map_lookup_elem(&ferry_ifaces, &ifindex);
	if (!cfg || cfg->kind != IFACE_MACHINE)
		return TC_ACT_OK; // not an interface of ours
	struct ipv6hdr *ip6 = ipv6_pull(skb);
	if (!ip6)
		return drop(STAT_NON_IPV6); // machines speak IPv6 only

	struct in6_addr *src = &ip6->saddr, *dst = &ip6->daddr;

	// Neighbour discovery and MLD: link-local or unspecified source, link-scope destination.
	if (is_unspecified(src) || (w(src, 0) & 0xffc0) == 0xfe80)
		return is_link_scope(dst) ? TC_ACT_OK : drop(STAT_SPOOFED_SRC);

	// Anti-spoofing: the source must be inside the machine's own /112.
	if (!is_fleet(src) || pair(src, 1) != cfg->net || pair(src, 3) != cfg->host ||
	    pair(src, 5) != cfg->machine)
		return drop(STAT_SPOOFED_SRC);

	if (is_link_scope(dst))
		return TC_ACT_OK;
	if (!is_fleet(dst))
		return drop(STAT_NOT_FLEET);

	__u32 dnet = pair(dst, 1), dhost = pair(dst, 3);
	if (dnet == 0 && dhost == 0)
		return TC_ACT_OK; // infrastructure services on this host (fdaa::3)
	// Isolation. A crafted infra-form destination lands here too: its first pair is a host ID,
	// which is never a network ID (the two spaces are disjoint).
	if (dnet != cfg->net)
		return drop(STAT_OTHER_NETWORK);
	if (dhost < HOST_MIN)
		return drop(STAT_BAD_DST);
	if (dhost == cfg->host)
		return TC_ACT_OK; // a machine on this host: the /112 route delivers it

	// Remote: infra form before routing, so the one route for that host's /48 matches.
	swap_fields(dst);
	count(STAT_SWAPPED_OUT);
	return TC_ACT_OK;
}

// Puts an infra-form address quoted inside an ICMPv6 error back into guest form.
static __always_inline void fix_quoted(struct __sk_buff *skb, __u32 off)
{
	struct in6_addr a;
	if (bpf_skb_load_bytes(skb, off, &a, sizeof(a)))
		return;
	if (!is_infra(&a))
		return;
	swap_fields(&a);
	bpf_skb_store_bytes(skb, off, &a, sizeof(a), 0);
	count(STAT_ICMP_INNER);
}

SEC("classifier/machine_out")
int machine_out(struct __sk_buff *skb)
{
	// Attached only to machine veths: nothing to look up.
	struct ipv6hdr *ip6 = ipv6_pull(skb);
	if (!ip6)
		return drop(STAT_NON_IPV6);

	if (is_infra(&ip6->saddr)) {
		swap_fields(&ip6->saddr);
		count(STAT_SWAPPED_IN);
	}
	if (ip6->nexthdr != IPPROTO_ICMPV6)
		return TC_ACT_OK;

	// ICMPv6 errors (types below 128) quote the offending packet's header after 8 bytes.
	__u32 l4 = sizeof(struct ethhdr) + sizeof(struct ipv6hdr);
	__u8 type;
	if (bpf_skb_load_bytes(skb, l4, &type, 1) || type >= 128)
		return TC_ACT_OK;
	__u32 inner = l4 + 8;
	fix_quoted(skb, inner + offsetof(struct ipv6hdr, saddr));
	fix_quoted(skb, inner + offsetof(struct ipv6hdr, daddr));
	return TC_ACT_OK;
}

SEC("classifier/fabric_out")
int fabric_out(struct __sk_buff *skb)
{
	__u32 host = this_host; // attached only to this host's fabric link
	struct ipv6hdr *ip6 = ipv6_pull(skb);
	if (!ip6)
		return TC_ACT_OK; // underlay traffic of the host itself

	struct in6_addr *src = &ip6->saddr, *dst = &ip6->daddr;
	if (!is_fleet(dst))
		return TC_ACT_OK; // underlay
	// Fleet traffic leaves only in infra form, towards another host.
	if (!is_infra(dst) || pair(dst, 1) == host)
		return drop(STAT_FABRIC_BAD_DST);
	if (is_guest(src)) {
		if (pair(src, 3) != host)
			return drop(STAT_FABRIC_BAD_SRC);
		swap_fields(src);
		count(STAT_SWAPPED_OUT);
	} else if (is_fleet(src)) {
		return drop(STAT_FABRIC_BAD_SRC); // service or infra-form sources never leave a host
	}
	return TC_ACT_OK;
}

SEC("classifier/fabric_in")
int fabric_in(struct __sk_buff *skb)
{
	__u32 host = this_host; // attached only to this host's fabric link
	struct ipv6hdr *ip6 = ipv6_pull(skb);
	if (!ip6)
		return TC_ACT_OK;

	struct in6_addr *src = &ip6->saddr, *dst = &ip6->daddr;
	if (!is_fleet(dst))
		return TC_ACT_OK; // underlay traffic for the host itself
	if (!is_infra(dst) || pair(dst, 1) != host)
		return drop(STAT_FABRIC_BAD_DST);

	if (is_fleet(src)) {
		// Isolation again, and no packet may claim to come from this host.
		if (!is_infra(src) || pair(src, 1) == host || pair(src, 3) != pair(dst, 3))
			return drop(STAT_FABRIC_BAD_SRC);
	} else {
		// From another host's own (underlay) address: only ICMPv6 errors it generated.
		if (ip6->nexthdr != IPPROTO_ICMPV6)
			return drop(STAT_FABRIC_BAD_SRC);
		__u8 type;
		if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + sizeof(struct ipv6hdr), &type, 1) ||
		    type >= 128)
			return drop(STAT_FABRIC_BAD_SRC);
		ip6 = ipv6_of(skb); // the load may not move data, but the verifier wants a fresh check
		if (!ip6)
			return TC_ACT_SHOT;
		dst = &ip6->daddr;
	}
	swap_fields(dst);
	count(STAT_SWAPPED_IN);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
