// SPDX-License-Identifier: GPL-2.0
//
// ferry's address-mapping bridge (docs/design.md#bridge, issue 5): four cgroup socket-address programs attached
// to every machine's cgroup (cgroup v2), so that a socket aimed at a machine's *old* address
// reaches its current one and the application still sees the old address as its peer.
//
//   connect6      TCP connect() and UDP connect(): old -> new destination; remembers the pair
//                 on the socket (sk storage) for getpeername6 and recvmsg6.
//   sendmsg6      UDP sendto()/sendmsg() with an address: old -> new destination; remembers the
//                 pair on the socket too.
//   recvmsg6      UDP recvfrom()/recvmsg(): a datagram from the new address is reported as coming
//                 from the old one, but only on sockets that dialled an old address themselves.
//   getpeername6  getpeername() on a socket connected through the bridge: reports the old address.
//
// Rewriting in the socket layer happens once per connect() or per datagram sent with an address,
// before routing; the packets themselves carry the new address from the start, so there is no
// per-packet translation and no conntrack state (unlike a DNAT rule).
//
// Isolation: mappings are keyed by network ID, and the network used for the lookup is always the
// *caller's* own network (from `bridge_cfg`, written by the agent), never derived from the
// destination alone. A mapping only applies when the old address's network field also equals the
// caller's network, so one org's mapping can never steer another org's sockets (and the data
// plane's TC isolation still drops anything that crosses networks).
//
// Feature gate: the programs do nothing for a caller whose cgroup has no `bridge_cfg` entry or an
// entry with `enabled == 0`.
//
// Retirement: a mapping whose value carries BRIDGE_RETIRED makes connect()/sendmsg() to the old
// address fail at once with EPERM (return 0), instead of the SYN or datagram disappearing into a
// neighbour-discovery timeout.
//
// Verifier constraints shaping the code:
//  * `ctx->user_ip6[i]` and `ctx->msg_src_ip6[i]` may only be read and written as whole aligned
//    32-bit words (narrower or wider accesses are rejected), so addresses move word by word and
//    are compared as words. The words are in network byte order.
//  * recvmsg6 and getpeername6 must return 1 (the verifier enforces it); only connect6 and
//    sendmsg6 may refuse with 0.
//  * Hash keys are compared bytewise, so every key struct has explicit padding that is zeroed.

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define FLEET_PREFIX 0xfdaa

// `bridge_map` value flags.
#define BRIDGE_RETIRED 1u

// The deepest cgroup level searched for a config (see `lookup_cfg`).
#define MAX_CGROUP_LEVELS 32

// Counters (indices match `BridgeStat` in src/bridge.rs).
enum stat {
	STAT_CONNECT_REWRITTEN = 0,
	STAT_SENDMSG_REWRITTEN = 1,
	STAT_RETIRED_REFUSED = 2,
	STAT_RECVMSG_RESTORED = 3,
	STAT_GETPEERNAME_RESTORED = 4,
	STAT_HITS_FULL = 5,
	STAT_STORAGE_FAILED = 6,
	STAT_MAX = 16,
};

// An IPv6 address as the four network-order words the context exposes.
struct addr6 {
	__u32 w[4];
};

struct map_key {
	__u32 net;
	struct addr6 old;
};

struct map_value {
	struct addr6 new;
	__u32 flags;
};

struct rev_key {
	__u32 net;
	struct addr6 new;
};

struct rev_value {
	struct addr6 old;
};

// Keyed by cgroup v2 ID (the inode number of the cgroup directory).
struct machine_cfg {
	__u32 net;
	__u32 enabled;
	// The machine's own primary address, for the agent's reports (hits name callers by cgroup).
	struct addr6 self_addr;
};

struct hit_key {
	__u32 net;
	__u32 _pad; // explicit, zeroed: keys compare bytewise
	struct addr6 old;
	__u64 caller_cgroup;
};

// One CPU's share of a hit (see `bridge_hits_pc`); a CPU that never saw the hit has all zeros.
// Timestamps are CLOCK_BOOTTIME nanoseconds (`bpf_ktime_get_boot_ns`): unlike
// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) it keeps counting across suspend, so userspace turns it
// into wall time with a single offset (now_wall - now_boottime).
struct hit_value {
	__u64 count;
	__u64 first_ns;
	__u64 last_ns;
};

// What a socket dialled through the bridge (per socket, freed with it).
struct sk_bridge {
	struct addr6 old;
	struct addr6 new;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct map_key);
	__type(value, struct map_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bridge_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct rev_key);
	__type(value, struct rev_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bridge_rev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct machine_cfg);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bridge_cfg SEC(".maps");

// Per-CPU values: a hit is counted on the CPU it happens on, with no atomic and no shared cache
// line; the reader (`Bridge::hits`) sums the counts and takes the earliest first_ns and the
// latest last_ns. Not preallocated (per-CPU preallocation would cost entries x CPUs up front).
// Its own name: a pinned `bridge_hits` left by an older build is a plain hash.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 262144);
	__type(key, struct hit_key);
	__type(value, struct hit_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bridge_hits_pc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bridge_stats SEC(".maps");

// Socket local storage: the kernel requires BTF for key and value (clang -g provides it),
// no preallocation and max_entries 0.
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sk_bridge);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bridge_sk SEC(".maps");

static __always_inline void count(__u32 what)
{
	__u64 *v = bpf_map_lookup_elem(&bridge_stats, &what);
	if (v)
		*v += 1; // per-CPU slot: no atomics needed
}

// The calling machine's config. A machine's processes may sit in sub-cgroups of the machine's
// cgroup (the programs are inherited by descendants), so when the task's own cgroup has no entry
// the nearest configured ancestor wins. The common case (the task's own cgroup is the machine's)
// is one lookup; only a miss walks the ancestors. Ancestor level 0 is the root; the helper
// returns 0 past the task's own level. The walk collects the ancestors top-down, then looks them
// up bottom-up and stops at the first (nearest) one configured.
static __always_inline struct machine_cfg *lookup_cfg(__u64 *cgroup_id)
{
	__u64 id = bpf_get_current_cgroup_id();
	struct machine_cfg *cfg = bpf_map_lookup_elem(&bridge_cfg, &id);
	if (cfg) {
		*cgroup_id = id;
		return cfg;
	}
	__u64 anc[MAX_CGROUP_LEVELS] = {};
	int depth = 0;
	for (int level = 1; level < MAX_CGROUP_LEVELS; level++) {
		__u64 a = bpf_get_current_ancestor_cgroup_id(level);
		if (!a)
			break;
		anc[level] = a;
		depth = level;
	}
	for (int level = MAX_CGROUP_LEVELS - 1; level >= 1; level--) {
		if (level > depth)
			continue;
		__u64 a = anc[level];
		struct machine_cfg *c = bpf_map_lookup_elem(&bridge_cfg, &a);
		if (c) {
			*cgroup_id = a;
			return c;
		}
	}
	return 0;
}

// Network ID of a guest-form address given as network-order words: `fdaa:NNNN:NNNN:...`, i.e.
// the low half of word 0 and the high half of word 1. Returns 0 (never a valid network) for
// anything outside fdaa::/16.
static __always_inline __u32 addr_net(const struct addr6 *a)
{
	__u32 w0 = bpf_ntohl(a->w[0]);
	__u32 w1 = bpf_ntohl(a->w[1]);
	if ((w0 >> 16) != FLEET_PREFIX)
		return 0;
	return ((w0 & 0xffff) << 16) | (w1 >> 16);
}

static __always_inline int addr_eq(const struct addr6 *a, const struct addr6 *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] &&
	       a->w[3] == b->w[3];
}

// Whole-word reads and writes of the context (see the verifier note at the top).
static __always_inline void read_user_ip6(const struct bpf_sock_addr *ctx, struct addr6 *a)
{
	a->w[0] = ctx->user_ip6[0];
	a->w[1] = ctx->user_ip6[1];
	a->w[2] = ctx->user_ip6[2];
	a->w[3] = ctx->user_ip6[3];
}

static __always_inline void write_user_ip6(struct bpf_sock_addr *ctx, const struct addr6 *a)
{
	ctx->user_ip6[0] = a->w[0];
	ctx->user_ip6[1] = a->w[1];
	ctx->user_ip6[2] = a->w[2];
	ctx->user_ip6[3] = a->w[3];
}

static __always_inline void add_hit(struct hit_value *v, __u64 now)
{
	v->count += 1; // this CPU's slot: no atomics needed
	if (!v->first_ns)
		v->first_ns = now;
	v->last_ns = now;
}

static __always_inline void record_hit(__u32 net, const struct addr6 *old, __u64 caller)
{
	struct hit_key key = {};
	key.net = net;
	key._pad = 0;
	key.old = *old;
	key.caller_cgroup = caller;
	__u64 now = bpf_ktime_get_boot_ns();
	struct hit_value *v = bpf_map_lookup_elem(&bridge_hits_pc, &key);
	if (v) {
		add_hit(v, now);
		return;
	}
	// First hit of this key: the update fills this CPU's slot and zeroes the others'.
	struct hit_value fresh = { .count = 1, .first_ns = now, .last_ns = now };
	if (!bpf_map_update_elem(&bridge_hits_pc, &key, &fresh, BPF_NOEXIST))
		return;
	// Another CPU created the entry first (EEXIST): add to this CPU's slot. Anything else means
	// the table is full: the connection still works, only the count is lost.
	v = bpf_map_lookup_elem(&bridge_hits_pc, &key);
	if (!v) {
		count(STAT_HITS_FULL);
		return;
	}
	add_hit(v, now);
}

// Shared by connect6 and sendmsg6: 1 = go ahead (rewritten or untouched), 0 = refuse.
static __always_inline int rewrite_destination(struct bpf_sock_addr *ctx, __u32 rewritten_stat)
{
	__u64 caller = 0;
	struct machine_cfg *cfg = lookup_cfg(&caller);
	if (!cfg || !cfg->enabled)
		return 1;

	struct map_key key = {};
	read_user_ip6(ctx, &key.old);
	// Only addresses of the caller's own network are candidates: this is what keeps mappings
	// inside one org whatever the map holds.
	__u32 net = cfg->net;
	if (net == 0 || addr_net(&key.old) != net)
		return 1;
	key.net = net;

	struct map_value *v = bpf_map_lookup_elem(&bridge_map, &key);
	if (!v)
		return 1;
	record_hit(net, &key.old, caller);
	if (v->flags & BRIDGE_RETIRED) {
		count(STAT_RETIRED_REFUSED);
		return 0; // EPERM right away
	}
	struct addr6 new = v->new;
	write_user_ip6(ctx, &new);
	count(rewritten_stat);

	// Remember what the application dialled, so getpeername6/recvmsg6 can show it the old
	// address. The storage lives and dies with the socket.
	// A new storage is created already holding the pair; an existing one (a UDP socket sending
	// again) is only written when the pair changed.
	struct bpf_sock *sk = ctx->sk;
	if (sk) {
		struct sk_bridge pair = { .old = key.old, .new = new };
		struct sk_bridge *s =
			bpf_sk_storage_get(&bridge_sk, sk, &pair, BPF_SK_STORAGE_GET_F_CREATE);
		if (!s)
			count(STAT_STORAGE_FAILED);
		else if (!addr_eq(&s->old, &pair.old) || !addr_eq(&s->new, &pair.new))
			*s = pair;
	}
	return 1;
}

SEC("cgroup/connect6")
int bridge_connect6(struct bpf_sock_addr *ctx)
{
	return rewrite_destination(ctx, STAT_CONNECT_REWRITTEN);
}

SEC("cgroup/sendmsg6")
int bridge_sendmsg6(struct bpf_sock_addr *ctx)
{
	return rewrite_destination(ctx, STAT_SENDMSG_REWRITTEN);
}

// A datagram's source is reported as the old address only on a socket that dialled an old
// address itself (it has bridge storage): a server that never heard of the old address keeps
// seeing the truth. The socket's own last pair wins (it is exactly what this socket dialled when
// several old addresses map to one new); otherwise the network's reverse map names the old one.
SEC("cgroup/recvmsg6")
int bridge_recvmsg6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct sk_bridge *s = bpf_sk_storage_get(&bridge_sk, sk, 0, 0);
	if (!s)
		return 1;
	struct addr6 src;
	read_user_ip6(ctx, &src);
	if (addr_eq(&src, &s->new)) {
		struct addr6 old = s->old;
		write_user_ip6(ctx, &old);
		count(STAT_RECVMSG_RESTORED);
		return 1;
	}
	// The network is the one of the old address this socket dialled (a caller's own network by
	// construction), not the datagram's.
	struct rev_key key = {};
	key.net = addr_net(&s->old);
	key.new = src;
	struct rev_value *r = bpf_map_lookup_elem(&bridge_rev, &key);
	if (r) {
		struct addr6 old = r->old;
		write_user_ip6(ctx, &old);
		count(STAT_RECVMSG_RESTORED);
	}
	return 1;
}

// getpeername() on a socket connected through the bridge returns exactly the address the
// application dialled (not a reverse-map guess), provided the peer is still the one connect6 set.
SEC("cgroup/getpeername6")
int bridge_getpeername6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct sk_bridge *s = bpf_sk_storage_get(&bridge_sk, sk, 0, 0);
	if (!s)
		return 1;
	struct addr6 peer;
	read_user_ip6(ctx, &peer);
	if (addr_eq(&peer, &s->new)) {
		struct addr6 old = s->old;
		write_user_ip6(ctx, &old);
		count(STAT_GETPEERNAME_RESTORED);
	}
	return 1;
}

char _license[] SEC("license") = "GPL";
