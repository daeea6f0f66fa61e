#!/usr/bin/env python3
"""cg1 scripts against the cg2 Functions library, on identical random inputs.

Starts its own redis-server on a free port, loads lua/lib.lua + each cg1
operation (EVALSHA) and lua/creditgate.lua (FUNCTION LOAD), then runs random
workloads (the shape of tests/differential.rs: three customers, one with
`{`, `}`, `:`, a space and UTF-8 in its id; every feature and credit system
of the test catalog; grants of every kind; clock jumps from seconds to
years; idempotency keys; locks) on both layouts and compares every answer
and, after every step, every customer's balances and due-index score.

A fifth of the cases runs cg2 without a clock (Redis TIME) and replays cg1
at the instant cg2 reported, as the Rust differential test will.

It also decodes cg2 pool strings exactly as lua/README-cg2.md specifies
(decode_pool below is the reference decoder).

Usage: benches/cg2_diff.py [cases, default 300] [seed]
Needs redis-py (python3 -m venv /tmp/fnvenv && /tmp/fnvenv/bin/pip install redis).
"""
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_INSTANT = 253402300799999
DAY = 86400000
MINUTE = 60000
HOUR = 3600000
START = 1798761600000  # 2027-01-01T00:00Z

# ---------------------------------------------------------------- keys
def escape(cid):
    out = []
    for b in cid.encode():
        if 0x21 <= b <= 0x7E and b not in b"{}%:":
            out.append(chr(b))
        else:
            out.append("%%%02X" % b)
    return "".join(out)


def crc16(data):
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def base36(n):
    d = "0123456789abcdefghijklmnopqrstuvwxyz"
    s = ""
    while True:
        s = d[n % 36] + s
        n //= 36
        if n == 0:
            return s


_TAGS = {}


def slot_tag(slot):
    if not _TAGS:
        n = 0
        while len(_TAGS) < 16384:
            s = base36(n)
            _TAGS.setdefault(crc16(s.encode()) % 16384, s)
            n += 1
    return _TAGS[slot]


def keys(layout, cid):
    tag = escape(cid)
    c = "%s:{%s}" % (layout, tag)
    return [c, c + ":l", "%s:due:{%s}" % (layout, slot_tag(crc16(tag.encode()) % 16384))]


# ---------------------------------------------------------------- catalog
CREDIT = {
    "credits": [("action1", 200000), ("action2", 600000)],
    "msg_credits": [("basic_message", 1000000), ("premium_message", 10000000)],
    "req_credits": [("premium_request", 3000000)],
    "thirds": [("third", 333333)],
}
FEATURES = ["action1", "action2", "credits", "basic_message", "premium_message", "msg_credits",
            "premium_request", "req_credits", "third", "thirds", "api_call"]


def pools_for(feature):
    if feature not in FEATURES:
        return ["-1"]
    pools = [(feature, 1000000)]
    if feature not in CREDIT:
        for cs in FEATURES:
            for f, c in CREDIT.get(cs, []):
                if f == feature:
                    pools.append((cs, c))
    out = [str(len(pools))]
    for p, c in pools:
        out += [p, str(c)]
    return out


# ---------------------------------------------------------------- calendar (twin of src/calendar.rs)
def civil_from_ms(t):
    days, tod = divmod(t, DAY)
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    y = yoe + era * 400 + (1 if m <= 2 else 0)
    return y, m, d, tod


def days_from_civil(y, m, d):
    y = y - 1 if m <= 2 else y
    era = y // 400
    yoe = y - era * 400
    mp = (m + 9) % 12
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def days_in_month(y, m):
    if m == 2:
        return 29 if (y % 4 == 0 and y % 100 != 0) or y % 400 == 0 else 28
    return [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][m - 1]


def add_months(t, months):
    y, m, d, tod = civil_from_ms(t)
    total = y * 12 + (m - 1) + months
    ny, nm = total // 12, total % 12 + 1
    return days_from_civil(ny, nm, min(d, days_in_month(ny, nm))) * DAY + tod


INTERVALS = ["one_off", "minute", "hour", "day", "week", "month", "quarter", "semi_annual", "year"]
STEP_MS = {1: MINUTE, 2: HOUR, 3: DAY, 4: 7 * DAY}
STEP_MONTHS = {5: 1, 6: 3, 7: 6, 8: 12}


def boundary(code, count, anchor, index):
    if code in STEP_MS:
        return anchor + index * STEP_MS[code] * count
    return add_months(anchor, index * STEP_MONTHS[code] * count)


def nominal(code, count):
    if code == 0:
        return 0
    if code in STEP_MS:
        return STEP_MS[code] * count
    return STEP_MONTHS[code] * count * 31 * DAY


# ---------------------------------------------------------------- cg2 pool strings (reference decoder)
def d36(s):
    return None if s == "" else int(s, 36)


def decode_pool(pool, s):
    """A pool string -> bucket dicts in the pool's deduction order."""
    out = []
    for bs in s.split("\x1e"):
        f = bs.split("\x1f") + [""] * 13
        if f[0].startswith("!"):  # marker: flags u/o, a floor or rollover rows follow
            f[0] = f[0][1:]
        code, count = d36(f[3]) or 0, d36(f[4]) or 1
        anchor, idx = d36(f[5]) or 0, d36(f[6])
        rows = []
        if f[12]:
            for r in f[12].split("\x1d"):
                e, g, b = r.split(",")
                rows.append((d36(e), d36(g), d36(b)))
        ro = None
        if f[10]:
            mx, pct, ln = (f[10].split("/") + ["", "", ""])[:3]
            ro = (d36(mx), d36(pct), d36(ln))
        out.append(dict(
            balance_id=f[1], pool=pool, remaining=d36(f[0]), granted=d36(f[2]),
            interval=INTERVALS[code], interval_count=count, anchor=anchor, next_reset_index=idx,
            next_reset_at=None if idx is None else min(boundary(code, count, anchor, idx), MAX_INSTANT + 1),
            expires_at=d36(f[7]), unlimited="u" in f[8], overage_allowed="o" in f[8],
            carry_debt="d" in f[8], overage_floor=d36(f[9]), rollover=ro,
            plan_id=f[11] or None, rollovers=rows))
    return out


def view2(b):
    return (b["balance_id"], b["pool"], b["plan_id"] or "", b["granted"], b["remaining"], b["interval"],
            b["interval_count"], b["next_reset_at"], b["expires_at"], b["unlimited"], b["overage_allowed"],
            tuple(b["rollovers"]))


def s(v):
    return v.decode() if isinstance(v, bytes) else v


def opt(v):
    v = s(v)
    return None if v == "" else int(v)


def views1(raw):
    """cg1 bucket views -> {pool: [view in pool order]}."""
    by = {}
    for v in raw:
        bid, seq, pool, plan, g, r, iv, cnt, nra, exp, unl, ovg, rows = v
        iv = s(iv)
        code = INTERVALS.index(iv)
        rr = [(opt(rows[i]), int(rows[i + 1]), int(rows[i + 2])) for i in range(0, len(rows), 3)]
        t = (s(bid), s(pool), s(plan), int(g), int(r), iv, int(cnt), opt(nra), opt(exp), unl == 1, ovg == 1, tuple(rr))
        key = (0 if code else 1, nominal(code, int(cnt)), opt(exp) if opt(exp) is not None else float("inf"), int(seq))
        by.setdefault(s(pool), []).append((key, t))
    return {p: [t for _, t in sorted(l)] for p, l in by.items()}


def views2(flat):
    by = {}
    for i in range(0, len(flat), 2):
        p, st = s(flat[i]), s(flat[i + 1])
        if st:
            by[p] = [view2(b) for b in decode_pool(p, st)]
    return by


def entries(raw):
    return [(s(e[0]), s(e[1]), s(e[2]), opt(e[3]), int(e[4]), int(e[5])) for e in raw]


# ---------------------------------------------------------------- runners
class Err(Exception):
    pass


def free_port():
    so = socket.socket()
    so.bind(("127.0.0.1", 0))
    p = so.getsockname()[1]
    so.close()
    return p


class Server:
    def __init__(self):
        self.dir = tempfile.mkdtemp()
        self.port = free_port()
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.r = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                self.r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


OPS = ["create_customer", "grant", "update_bucket", "check", "apply", "balances", "reset_due"]


class Both:
    def __init__(self, r):
        self.r = r
        lib = open(os.path.join(ROOT, "lua/lib.lua")).read()
        self.sha = {}
        for op in OPS:
            body = (lib + open(os.path.join(ROOT, "lua/%s.lua" % op)).read()).rstrip("\n")
            self.sha[op] = r.script_load(body)
        r.function_load(open(os.path.join(ROOT, "lua/creditgate.lua")).read(), replace=True)

    def call1(self, op, ks, args):
        try:
            return self.r.evalsha(self.sha[op], len(ks), *ks, *args)
        except redis.ResponseError as e:
            raise Err(str(e).split(" @")[0])

    def call2(self, op, ks, args):
        try:
            return self.r.fcall("cg2_v1_" + op, len(ks), *ks, *args)
        except redis.ResponseError as e:
            msg = str(e)
            now = int(msg.rsplit("@", 1)[1]) if " @" in msg else None
            raise Err(msg.split(" @")[0]) from (ValueError(now) if now is not None else None)


def run_both(B, op, cid, args, now, clockless, nkeys=3):
    """Runs op on both layouts: cg2 first (maybe without clock), then cg1 at cg2's instant."""
    k1, k2 = keys("cg1", cid), keys("cg2", cid)
    if nkeys == 1:
        k1, k2 = k1[:1], k2[:1]
    head = [] if nkeys == 1 else ["86400000", "86400000", cid]
    a2 = ["" if clockless else str(now)] + head + args
    try:
        r2 = B.call2(op, k2, a2)
        used = int(r2[4] if op in ("check", "apply") else r2[1])
        r2 = ("ok", r2)
    except Err as e:
        used = e.__cause__.args[0] if e.__cause__ is not None else now
        r2 = ("err", str(e))
    try:
        r1 = ("ok", B.call1(op, k1, [str(used)] + head + args))
    except Err as e:
        r1 = ("err", str(e))
    return r1, r2, used


def normalize(op, r1, r2):
    if r1[0] != r2[0] or r1[0] == "err":
        return (r1[0], r1[1] if r1[0] == "err" else None), (r2[0], r2[1] if r2[0] == "err" else None)
    a, b = r1[1], r2[1]
    if op in ("check", "apply"):
        na = (a[0], a[1], s(a[2]), entries(a[3]), s(a[4]), views1(a[5]))
        nb = (b[0], b[1], s(b[2]), entries(b[3]), s(b[5]), views2(b[6]))
        return na, nb
    if op == "create_customer":
        return a, b[0]
    if op == "grant":
        return s(a), s(b[0])
    if op == "update_bucket":
        return a, b[0]
    if op == "reset_due":
        return a, b[0]
    raise ValueError(op)


def balances_both(B, cid, now):
    r1, r2, _ = run_both(B, "balances", cid, [], now, False)
    if r1[0] == "err" or r2[0] == "err":
        return (r1[0], r1[1] if r1[0] == "err" else None), (r2[0], r2[1] if r2[0] == "err" else None)
    a, b = r1[1], r2[1]
    return (a[0], views1(a[1])), (b[0], views2(b[2]))


# ---------------------------------------------------------------- random workloads
CUSTOMERS = ["c0", "c1", "we{ir}d: é"]
GRANT_POOLS = ["api_call"] * 6 + ["credits"] * 4 + ["action1"] * 3 + ["action1", "credits", "api_call", "thirds",
                                                                         "msg_credits", "action2"]
STEP_FEATURES = ["api_call"] * 8 + ["action1"] * 6 + ["action2"] * 3 + ["third"] * 2 + ["credits"] * 2 + \
    ["third", "thirds", "premium_message", "msg_credits", "nope"]
LOCKS = ["L1", "L2", "L3", "L{1}: é"]


def raw_amount(rng):
    x = rng.random()
    if x < 6 / 11:
        return rng.randrange(0, 2000000)
    if x < 9 / 11:
        return rng.randrange(0, 300) * 10000
    if x < 10 / 11:
        return rng.randrange(0, 10 ** 15 + 1)
    return 10 ** 15


def interval(rng):
    return rng.choice([0] * 4 + [1] + [2] * 2 + [3] + [4] + [5] * 4 + [6] + [8])


def grant_args(rng, now):
    pool = rng.choice(GRANT_POOLS)
    bid = rng.choice(["x", "y", "b2"]) if rng.random() < 0.15 else ""
    plan = "pro" if rng.random() < 0.2 else ""
    x = rng.random()
    granted = rng.randrange(0, 5000000) if x < 0.8 else (0 if x < 0.9 else rng.randrange(0, 10 ** 15 + 1))
    code = interval(rng)
    count = str(rng.randrange(1, 4)) if rng.random() < 0.2 else ""
    nxt = now + rng.randrange(1, 90 * DAY) if rng.random() < 0.1 else None
    exp = now + rng.randrange(1, 400 * DAY) if rng.random() < 0.15 else None
    unl = rng.random() < 0.08
    ovg = rng.random() < 0.25
    floor = str(-rng.randrange(0, 2000001)) if ovg and rng.random() < 0.4 else ""
    debt = rng.random() < 0.3
    # The clock-free input rules the Rust checks before the script.
    if code == 0:
        nxt = None
    if granted == 0 and not unl and not ovg:
        granted = 1
    ro, mx, pct, ln = "", "", "", ""
    y = rng.random()
    if y < 0.5 and code != 0 and not unl:
        cap = rng.random()
        if cap < 1 / 3:
            mx = str(rng.randrange(0, 3000000))
        elif cap < 2 / 3:
            pct = str(rng.randrange(0, 1000001))
        if y < 1 / 3:
            ro = "month"
            l = rng.randrange(0, 4)
            ln = str(l) if l else ""
            months = l or 1
            per = nominal(code, int(count or 1))
            if (months * 31 * DAY + per - 1) // per > 64:
                ro, mx, pct, ln = "", "", "", ""
        else:
            ro = "forever"
    flags = ("u" if unl else "") + ("o" if ovg else "") + ("d" if debt else "")
    return [pool, bid, plan, str(granted), str(code), count, "" if nxt is None else str(nxt),
            "" if exp is None else str(exp), flags, floor, ro, mx, pct, ln]


def idem_key(rng):
    return rng.choice(["k1", "k2", "k3"]) if rng.random() < 0.3 else ""


def step(rng, now):
    w = rng.random() * 36
    c = rng.choice([0] * 5 + [1] * 2 + [2] * 2)
    cid = CUSTOMERS[c]
    f = rng.choice(STEP_FEATURES)
    if w < 1:
        return ("create_customer", cid, [], 1)
    if w < 5:
        return ("grant", cid, grant_args(rng, now), 3)
    if w < 6:
        v = raw_amount(rng) * (-1 if rng.random() < 0.5 else 1)
        return ("update_bucket", cid, [rng.choice(["api_call", "credits", "action1"]),
                                        rng.choice(["b1", "b2", "x"]) if rng.random() < 0.5 else "",
                                        rng.choice(["set", "add"]), str(v)], 3)
    if w < 9:
        return ("check", cid, [f, str(raw_amount(rng))] + pools_for(f), 3)
    if w < 13:
        return ("apply", cid, ["consume", idem_key(rng), f, str(raw_amount(rng)), "", "", ""] + pools_for(f), 3)
    if w < 19:
        u = raw_amount(rng) * (-1 if rng.random() < 0.25 else 1)
        return ("apply", cid, ["track", idem_key(rng), f, str(u), rng.choice(["cap", "reject", "overflow"]), "", ""]
                + pools_for(f), 3)
    if w < 22:
        e = str(now + rng.randrange(-MINUTE, 2 * HOUR)) if rng.random() < 0.5 else ""
        return ("apply", cid, ["reserve", idem_key(rng), f, str(raw_amount(rng)), "", rng.choice(LOCKS), e]
                + pools_for(f), 3)
    if w < 25:
        o = str(raw_amount(rng)) if rng.random() < 0.4 else ""
        return ("apply", cid, ["finalize", idem_key(rng), "", o, rng.choice(["confirm", "release"]),
                               rng.choice(LOCKS), "", "0"], 3)
    if w < 29:
        x = rng.random()
        d = rng.randrange(1, 2 * MINUTE) if x < 0.4 else rng.randrange(1, DAY) if x < 0.7 else \
            rng.randrange(1, 40 * DAY) if x < 0.9 else rng.randrange(1, 3 * 365 * DAY)
        return ("advance", d)
    if w < 30:
        return ("reset_due", cid, [], 3)
    return ("repeat",)


def run_case(B, rng, stats):
    B.r.flushall()
    # A fifth of the cases run cg2 without a clock (Redis TIME), as
    # production does; their clock cannot be advanced, so they skip advances.
    clockless = rng.random() < 0.2
    now = int(B.r.time()[0]) * 1000 if clockless else START
    n0 = rng.choice([1, 2, 3, 3, 3, 3])
    for cid in CUSTOMERS[:n0]:
        run_both(B, "create_customer", cid, [], now, False, nkeys=1)
    steps = [("grant", CUSTOMERS[rng.choice([0] * 5 + [1] * 2 + [2] * 2)], grant_args(rng, now), 3)
             for _ in range(rng.randrange(1, 6))]
    steps += [None] * rng.randrange(1, 60)
    last = None
    for i, st in enumerate(steps):
        if st is None:
            st = step(rng, now)
        if st[0] == "advance":
            if not clockless:
                now += st[1]
            continue
        if st[0] == "repeat":
            if last is None:
                continue
            op, cid, args, nk = last
            args = list(args)
            if not args[1]:
                args[1] = "k1"
            st = (op, cid, args, nk)
        if st[0] == "apply":
            last = st
        op, cid, args, nk = st
        r1, r2, used = run_both(B, op, cid, args, now, clockless, nkeys=nk)
        now = max(now, used)
        a, b = normalize(op, r1, r2)
        stats[(op, r1[0], s(args[0]) if op == "apply" else "")] = stats.get((op, r1[0], s(args[0]) if op == "apply" else ""), 0) + 1
        if a != b:
            return "step %d %s %r %r at %d:\n cg1 %r\n cg2 %r" % (i, op, cid, args, used, a, b)
        for c in CUSTOMERS:
            x, y = balances_both(B, c, now)
            if x != y:
                return "balances of %r after step %d %s %r:\n cg1 %r\n cg2 %r" % (c, i, op, args, x, y)
            d1 = B.r.zscore(keys("cg1", c)[2], c)
            d2 = B.r.zscore(keys("cg2", c)[2], c)
            if d1 != d2:
                return "due of %r after step %d %s %r: cg1 %r cg2 %r" % (c, i, op, args, d1, d2)
    return None


def main():
    cases = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    srv = Server()
    try:
        B = Both(srv.r)
        stats = {}
        for n in range(cases):
            rng = random.Random(seed * 1000003 + n)
            err = run_case(B, rng, stats)
            if err:
                print("case %d (seed %d) FAILED: %s" % (n, seed, err))
                sys.exit(1)
        print("%d cases equal (seed %d)" % (cases, seed))
        for k in sorted(stats):
            print("  %-40s %d" % (" ".join(x for x in k if x), stats[k]))
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
