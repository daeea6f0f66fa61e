"""Another service calling the creditgate library directly with FCALL
(redis-py), on the same Redis the sidecar uses, interleaved with the
sidecar's HTTP API: create, grant, consume, track and check by FCALL, check
and track over HTTP, and both sides see the same balances to the last
decimal. The contract is lua/README.md.

Started by tests/sdk/run.sh, which passes CREDITGATE_TEST_REDIS_URL (the
sidecar's Redis) on the Redis run; skipped on the in-process engine.
"""

import json
import os
import urllib.request
import uuid
from decimal import Decimal

import pytest

redis = pytest.importorskip("redis")

URL = os.environ["CREDITGATE_URL"]
REDIS_URL = os.environ.get("CREDITGATE_TEST_REDIS_URL", "")
pytestmark = pytest.mark.skipif(not REDIS_URL, reason="the sidecar runs on the in-process engine")

AMOUNT = Decimal(10000)  # amounts are integers in 1/10 000ths
US, RS, GS = "\x1f", "\x1e", "\x1d"


def crc16(data: bytes) -> int:
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def escape(customer_id: str) -> str:
    """The hash tag: the id with {, }, %, :, space, control and non-ASCII bytes as %XX."""
    out = []
    for b in customer_id.encode():
        if 0x21 <= b <= 0x7E and chr(b) not in "{}%:":
            out.append(chr(b))
        else:
            out.append("%%%02X" % b)
    return "".join(out)


def slot_tag(tag: str) -> str:
    """The first base-36 string (0, 1, ..., z, 10, ...) in the tag's cluster slot."""
    want = crc16(tag.encode()) % 16384
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    n = 0
    while True:
        s, m = "", n
        while True:
            s = digits[m % 36] + s
            m //= 36
            if m == 0:
                break
        if crc16(s.encode()) % 16384 == want:
            return s
        n += 1


def keys(customer_id: str):
    tag = escape(customer_id)
    return [f"cg2:{{{tag}}}", f"cg2:due:{{{slot_tag(tag)}}}"]


def b36(s: str) -> int:
    return -int(s[1:], 36) if s.startswith("-") else int(s, 36)


def pool_remaining(pool_string: str) -> Decimal:
    """A pool's remaining from its string (lua/README.md 5.2): the sum over
    buckets of max(0, remaining) plus their rollover rows' balances."""
    total = 0
    if pool_string:
        for bucket in pool_string.split(RS):
            f = bucket.split(US)
            total += max(0, b36(f[0].lstrip("!")))
            if len(f) >= 13 and f[12]:
                total += sum(b36(row.split(",")[2]) for row in f[12].split(GS))
    return Decimal(total) / AMOUNT


def http(path, body):
    req = urllib.request.Request(
        URL + path,
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": "Bearer " + os.environ["CREDITGATE_ADMIN_KEY"],
        },
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read(), parse_float=Decimal)


@pytest.fixture
def r():
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    client.close()


def test_fcall_and_http_see_the_same_balances(r):
    cid = "py-" + uuid.uuid4().hex + " {é}"
    k = keys(cid)
    fn = r.execute_command("FUNCTION", "LIST", "LIBRARYNAME", "creditgate_cg2_v7")
    assert fn, "the sidecar loaded the library"

    def fcall(function, *args):
        return r.fcall("cg2_v7_" + function, len(k), *k, *args)

    def direct():
        """Every owned pool's remaining, by FCALL balances."""
        reply = fcall("balances", "", "")
        return {reply[i]: pool_remaining(reply[i + 1]) for i in range(2, len(reply), 2)}

    def over_http():
        got = http("/v1/customers.get", {"customer_id": cid})
        return {p: Decimal(b["remaining"]) for p, b in got["balances"].items()}

    # create and grant by FCALL: 10 thirds one-off, 100 ai_credits a month.
    created, now = fcall("create_customer")
    assert created == 1 and now > 0
    assert fcall("grant", "", "", "thirds", "", "", "100000", "0")[0] == "b1"
    assert fcall("grant", "", "", "ai_credits", "", "", "1000000", "5", "1")[0] == "b2"
    assert over_http() == direct() == {"thirds": Decimal(10), "ai_credits": Decimal(100)}

    # A consuming check over HTTP: 1 third costs 0.3334 (charges round up).
    checked = http("/v1/check", {"customer_id": cid, "feature_id": "third", "send_event": True})
    assert checked["allowed"] is True
    assert direct()["thirds"] == Decimal("9.6666") == over_http()["thirds"]

    # consume by FCALL: 2.5 thirds cost ceil(2.5 x 0.333333 x 10^4) = 8334.
    out = fcall("consume", "", "", "", "third", "25000", "third", "1000000", "thirds", "333333")
    flags, uncovered, at, entries = out[0], out[1], out[2], out[3]
    assert (flags & 1, uncovered) == (1, 0)
    assert entries == f"thirds{US}b1{US}{US}8334{US}25000"
    assert out[4] == "third" and out[5:7] == ["third", ""] and out[7] == "thirds"
    assert pool_remaining(out[8]) == Decimal("8.8332")
    assert over_http()["thirds"] == Decimal("8.8332")

    # track by FCALL with an idempotency key: 3 action1 = 0.6 ai_credits,
    # and its retry replays (flag 8) without moving anything.
    key = str(uuid.uuid4())
    track = ("track", "", "", key, "action1", "30000", "cap", "action1", "1000000", "ai_credits", "200000")
    first = fcall(*track)
    assert first[0] == 1 and first[3] == f"ai_credits{US}b2{US}{US}6000{US}30000"
    again = fcall(*track)
    assert again[0] == 1 | 8 and again[3] == first[3]
    assert over_http()["ai_credits"] == Decimal("99.4") == direct()["ai_credits"]

    # track over HTTP: 1.5 action1 = 0.3 ai_credits.
    tracked = http("/v1/track", {"customer_id": cid, "feature_id": "action1", "value": 1.5})
    assert tracked["balance"]["remaining"] == Decimal("99.1")

    # check by FCALL (a dry run): 495.5 action1 = 99.1 credits fit exactly, one more unit does not.
    fits = fcall("check", "", "", "action1", "4955000", "action1", "1000000", "ai_credits", "200000")
    assert fits[0] & 1 == 1 and fits[1] == 0
    short = fcall("check", "", "", "action1", "4955001", "action1", "1000000", "ai_credits", "200000")
    assert short[0] & 1 == 0 and short[1] == 1  # one unit uncovered
    assert over_http() == direct() == {"thirds": Decimal("8.8332"), "ai_credits": Decimal("99.1")}

    # Errors carry their code and the instant: -CG <code> @<now>.
    with pytest.raises(redis.ResponseError, match=r"^CG feature_not_found @\d+$"):
        fcall("consume", "", "", "", "nope", "10000")
