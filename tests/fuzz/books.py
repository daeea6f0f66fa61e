"""The fuzz run's books (tests/fuzz/run.sh).

seed URL                      seeds the customers the schema's examples name
compare FUZZED REPLAYED HAR…  replays every 2xx answer of the HAR reports, in
                              order, on REPLAYED (seeded the same way) and
                              checks both servers show the same balances for
                              every seeded customer.
"""
import json
import sys
import urllib.error
import urllib.request

ADMIN = "sk_fuzz_admin"
# alice is the customer every schema example names; bob is never named, so
# nothing may ever change his balances.
SEEDED = ["alice", "bob"]


def post(base, path, body, key=ADMIN, headers=None):
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def seed(base):
    for c in SEEDED:
        assert post(base, "/v1/billing.attach", {"customer_id": c, "plan_id": "pro"})[0] == 200
        status, _ = post(
            base,
            "/v1/balances.create",
            {"customer_id": c, "feature_id": "premium_message", "included_grant": 50, "balance_id": "top"},
        )
        assert status == 200, status


def books(base):
    """Every seeded customer's balances, without the instants (the two
    servers were seeded a few milliseconds apart)."""
    out = {}
    for c in SEEDED:
        status, body = post(base, "/v1/customers.get", {"customer_id": c})
        assert status == 200, (c, status, body)
        pools = {}
        for pool, b in (body.get("balances") or {}).items():
            pools[pool] = {
                "granted": b["granted"],
                "remaining": b["remaining"],
                "usage": b["usage"],
                "breakdown": sorted((x["id"], x["remaining"], x["usage"]) for x in b["breakdown"]),
            }
        out[c] = pools
    return out


def replay(base, har_paths):
    entries = []
    for p in har_paths:
        with open(p) as f:
            entries.extend(json.load(f)["log"]["entries"])
    entries.sort(key=lambda e: e["startedDateTime"])
    replayed = 0
    for e in entries:
        if not 200 <= e["response"]["status"] < 300:
            continue
        req = e["request"]
        path = "/" + req["url"].split("/", 3)[3]
        if not path.startswith("/v1/"):
            continue
        headers = {h["name"]: h["value"] for h in req["headers"]}
        body = (req.get("postData") or {}).get("text")
        r = urllib.request.Request(
            base + path,
            data=body.encode() if body is not None else None,
            headers=headers,
            method=req["method"],
        )
        try:
            with urllib.request.urlopen(r, timeout=10) as resp:
                resp.read()
        except urllib.error.HTTPError as err:
            err.read()
        replayed += 1
    return replayed


def main():
    cmd = sys.argv[1]
    if cmd == "seed":
        seed(sys.argv[2])
        return
    fuzzed, fresh, hars = sys.argv[2], sys.argv[3], sys.argv[4:]
    n = replay(fresh, hars)
    got, want = books(fuzzed), books(fresh)
    print(f"replayed {n} 2xx answers; seeded customers: {json.dumps(got, sort_keys=True)}")
    if got != want:
        print("MISMATCH: the fuzzed server's balances differ from the 2xx answers replayed")
        print(f"fuzzed:   {json.dumps(got, sort_keys=True)}")
        print(f"replayed: {json.dumps(want, sort_keys=True)}")
        sys.exit(1)
    bob = got["bob"]
    if bob["credits"]["remaining"] != 200 or bob["premium_message"]["remaining"] != 50:
        print(f"MISMATCH: bob, whom no request names, changed: {bob}")
        sys.exit(1)


if __name__ == "__main__":
    main()
