#!/usr/bin/env python3
"""Generates the sweep benchmark tree: about SIZE bytes (default 1 GiB) of mixed config files
(env, ini, yaml, json, toml) with realistic content, a sprinkling of fleet addresses (fdaa::/16)
in every textual form, and decoys that must not match (other IPv6 prefixes, MACs, times, hashes
containing "fdaa", IPv4, UUIDs).

Deterministic (fixed seed), so every run of the benchmark measures the same bytes.

Also writes DIR.owners.json (beside the tree, not in it): a machine list that owns every other
generated address (current for some, old for others), so the sweep also names owners.

usage: gen.py DIR [SIZE_BYTES]
"""
import json
import os
import random
import sys

rnd = random.Random(20261122)

WORDS = ("alpha beta gamma delta api web worker queue cache redis postgres primary replica "
         "region iad ord ams syd timeout retries pool size log level debug info warn error "
         "enable disable path tmp data var lib etc service name user password token secret "
         "bucket endpoint health check interval grace port listen bind upstream backend").split()


def word():
    return rnd.choice(WORDS)


def hexs(n):
    return "".join(rnd.choice("0123456789abcdef") for _ in range(n))


GENERATED = []


def guest():
    """A guest-form fleet address as 8 words (remembered, for the owners file)."""
    net = rnd.randrange(1, 1 << 31)
    host = rnd.randrange(1 << 31, 1 << 32)
    m = rnd.randrange(0, 1 << 32)
    w = [0xFDAA, net >> 16, net & 0xFFFF, host >> 16, host & 0xFFFF, m >> 16, m & 0xFFFF, 2]
    GENERATED.append(w)
    return w


def compressed(w):
    # Longest run of zero words, compressed once (RFC 5952 style).
    best, run = (0, -1), None
    for i, x in enumerate(w + [1]):
        if x == 0 and run is None:
            run = i
        elif x != 0 and run is not None:
            if i - run > best[0] and i - run > 1:
                best = (i - run, run)
            run = None
    if best[1] < 0:
        return ":".join("%x" % x for x in w)
    s, e = best[1], best[1] + best[0]
    return ":".join("%x" % x for x in w[:s]) + "::" + ":".join("%x" % x for x in w[e:])


def fleet_text():
    w = guest()
    form = rnd.randrange(7)
    if form == 0:
        return compressed(w)
    if form == 1:
        return compressed(w).upper()
    if form == 2:
        return ":".join("%04x" % x for x in w)
    if form == 3:
        return ":".join("%04X" % x for x in w)
    if form == 4:
        return "fdaa::3"
    if form == 5:
        return ":".join("%x" % x for x in w)
    return compressed(w[:6] + [0, 0])


def fleet_value():
    a = fleet_text()
    shape = rnd.randrange(5)
    if shape == 0:
        return a
    if shape == 1:
        return "[%s]:%d" % (a, rnd.choice([5432, 6379, 8080, 443]))
    if shape == 2:
        return "http://[%s]:%d/%s" % (a, rnd.choice([80, 8080, 9090]), word())
    if shape == 3:
        return "postgres://%s:%s@[%s]:5432/%s" % (word(), hexs(12), a, word())
    return "host=%s port=5432 dbname=%s" % (a, word())


def decoy():
    k = rnd.randrange(9)
    if k == 0:
        return "fd00::%x" % rnd.randrange(1, 65535)
    if k == 1:
        return "2001:db8::%x:%x" % (rnd.randrange(65535), rnd.randrange(65535))
    if k == 2:
        return ":".join(hexs(2) for _ in range(6))
    if k == 3:
        return "%02d:%02d:%02d" % (rnd.randrange(24), rnd.randrange(60), rnd.randrange(60))
    if k == 4:
        h = hexs(40)
        i = rnd.randrange(30)
        return h[:i] + "fdaa" + h[i + 4:]
    if k == 5:
        return "%d.%d.%d.%d" % tuple(rnd.randrange(256) for _ in range(4))
    if k == 6:
        return "%s-%s-%s-%s-%s" % (hexs(8), hexs(4), hexs(4), hexs(4), hexs(12))
    if k == 7:
        return "sha256:fdaa" + hexs(60)
    return "xfdaa::%x" % rnd.randrange(65535)


def value(fleet_rate):
    r = rnd.random()
    if r < fleet_rate:
        return fleet_value()
    if r < 0.25:
        return decoy()
    if r < 0.45:
        return str(rnd.randrange(100000))
    if r < 0.6:
        return "https://%s.%s.example.com/%s" % (word(), word(), word())
    return " ".join(word() for _ in range(rnd.randrange(1, 8)))


def key():
    return "%s_%s" % (word(), word())


def env_lines(n, fr):
    return ["%s=%s" % (key().upper(), value(fr)) if rnd.random() > 0.1 else "# %s %s" % (word(), word())
            for _ in range(n)]


def ini_lines(n, fr):
    out = []
    for i in range(n):
        if i % 12 == 0:
            out.append("[%s.%s]" % (word(), word()))
        else:
            out.append("%s = %s" % (key(), value(fr)))
    return out


def yaml_lines(n, fr):
    out = []
    for i in range(n):
        if i % 8 == 0:
            out.append("%s:" % word())
        elif rnd.random() < 0.1:
            out.append("  - %s" % value(fr))
        else:
            out.append("  %s: %s" % (key(), json.dumps(value(fr)) if rnd.random() < 0.4 else value(fr)))
    return out


def toml_lines(n, fr):
    out = []
    for i in range(n):
        if i % 10 == 0:
            out.append("[%s]" % word())
        elif rnd.random() < 0.1:
            out.append("%s = [%s, %s]" % (key(), json.dumps(value(fr)), json.dumps(value(fr))))
        else:
            out.append("%s = %s" % (key(), json.dumps(value(fr))))
    return out


def json_lines(n, fr):
    items = ['  "%s": %s' % (key(), json.dumps(value(fr))) for _ in range(n)]
    return ["{"] + [x + "," for x in items[:-1]] + items[-1:] + ["}"]


KINDS = [("env", env_lines), ("ini", ini_lines), ("yaml", yaml_lines), ("json", json_lines), ("toml", toml_lines)]


def main():
    root = sys.argv[1]
    total = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 30
    # Pools of ready lines per kind (clean ones and ones that may hold a fleet address), then
    # files are sampled from them: realistic line mix at a speed Python can reach for 1 GiB.
    pools = {}
    for ext, make in KINDS:
        pools[ext] = (make(20000, 0.0), make(4000, 0.02))
    written, n = 0, 0
    while written < total:
        ext, _ = KINDS[n % len(KINDS)]
        clean, dirty = pools[ext]
        size = int(min(max(rnd.lognormvariate(9.5, 1.2), 200), 4 << 20))
        nlines = max(3, size // 40)
        # Most configs hold no literal at all; about one file in twenty holds some.
        src = dirty if rnd.random() < 0.05 else clean
        lines = rnd.choices(src, k=nlines)
        if ext == "json":
            lines = ["{"] + [l for l in lines if l not in ("{", "}")] + ["}"]
        data = ("\n".join(lines) + "\n").encode()
        d = os.path.join(root, "svc%03d" % (n // 400), "app%02d" % ((n // 20) % 20))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "cfg%06d.%s" % (n, ext)), "wb") as f:
            f.write(data)
        written += len(data)
        n += 1
    machines = []
    for i, w in enumerate(GENERATED[::2]):
        ip = ":".join("%x" % x for x in w)
        rec = {"id": "%014x" % (0xd8dd625fe00000 + i), "app": "app%d" % (i % 7)}
        if i % 3 == 0:
            rec.update(private_ip="fdaa:1:2:8000:1:%x:%x:2" % (i >> 16, i & 0xFFFF), old_ips=[ip])
        else:
            rec.update(private_ip=ip, old_ips=[])
        machines.append(rec)
    with open(root.rstrip("/") + ".owners.json", "w") as f:
        json.dump({"machines": machines}, f)
    print("generated %d files, %d bytes under %s" % (n, written, root))


if __name__ == "__main__":
    main()
