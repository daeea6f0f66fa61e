"""Limits (issue 13) through the official Python SDK (autumn-sdk 1.2.0):
the SDK's own models must parse a customer whose `billing_controls` holds
both lists filled — Autumn's `usage_limits` and creditgate's `rate_limits`
— and a check refused by a limit, on every engine (the Redis engine keeps
limits since library v4). Run by tests/sdk/run.sh on each engine."""

import json
import os
import urllib.error
import urllib.request
import uuid

import pytest
from autumn_sdk import Autumn

URL = os.environ["CREDITGATE_URL"]


@pytest.fixture
def admin():
    return Autumn(secret_key=os.environ["CREDITGATE_ADMIN_KEY"], server_url=URL, fail_open=False)


@pytest.fixture
def app():
    return Autumn(secret_key=os.environ["CREDITGATE_APP_KEY"], server_url=URL, fail_open=False)


def post_raw(path, body):
    """`rate_limits` is creditgate's own list: the SDK's request model has
    no field for it, so it goes over plain HTTP."""
    req = urllib.request.Request(
        URL + path,
        data=json.dumps(body).encode(),
        headers={
            "Authorization": "Bearer " + os.environ["CREDITGATE_ADMIN_KEY"],
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


BOTH = {
    "usage_limits": [
        {"feature_id": "premium_message", "enabled": True, "limit": 50, "interval": "day"}
    ],
    "rate_limits": [
        {"feature_id": "basic_message", "limit": 2, "interval": "minute", "window": "sliding"},
        {"feature_id": "api_call", "kind": "rate", "rate": 5, "interval": "second",
         "burst": 10, "shadow": True},
    ],
}


def test_billing_controls_parse_in_the_sdk_models(admin, app):
    cid = "sdk-" + uuid.uuid4().hex
    admin.customers.get_or_create(customer_id=cid)
    admin.billing.attach(customer_id=cid, plan_id="pro")
    status, answer = post_raw("/v1/customers.update", {"customer_id": cid, "billing_controls": BOTH})
    assert status == 200, answer
    assert len(answer["billing_controls"]["rate_limits"]) == 2

    got = admin.customers.get(customer_id=cid)
    (limit,) = got.billing_controls.usage_limits
    assert (limit.feature_id, limit.limit, limit.interval, limit.enabled, limit.anchor) == (
        "premium_message", 50, "day", True, "utc")

    # The SDK's own update, usage_limits only: rate_limits stay.
    updated = admin.customers.update(
        customer_id=cid,
        billing_controls={"usage_limits": [
            {"feature_id": "premium_message", "limit": 40, "interval": "week", "anchor": "billing_cycle"}]},
    )
    (limit,) = updated.billing_controls.usage_limits
    assert (limit.limit, limit.interval, limit.anchor) == (40, "week", "billing_cycle")
    _, raw = post_raw("/v1/customers.get", {"customer_id": cid})
    assert [r["id"] for r in raw["billing_controls"]["rate_limits"]] == [
        "basic_message:minute", "api_call:rate"]

    # A check refused by the 2-a-minute limit parses too.
    for _ in range(2):
        assert app.check(customer_id=cid, feature_id="basic_message", send_event=True).allowed
    denied = app.check(customer_id=cid, feature_id="basic_message", send_event=True)
    assert denied.allowed is False


# ---- usage alerts (issue 14): kept by the in-process engine only ----

needs_alerts = pytest.mark.skipif(
    os.environ.get("CREDITGATE_TEST_LEDGER", "1") != "1",
    reason="this engine keeps no usage alerts yet (the Redis engine answers "
    "400 alerts_unsupported to billing_controls.usage_alerts)",
)


@needs_alerts
def test_usage_alerts_parse_in_the_sdk_models(admin):
    cid = "sdk-" + uuid.uuid4().hex
    admin.customers.get_or_create(customer_id=cid)
    admin.billing.attach(customer_id=cid, plan_id="pro")
    updated = admin.customers.update(
        customer_id=cid,
        billing_controls={"usage_alerts": [
            {"feature_id": "credits", "threshold": 80, "threshold_type": "usage_percentage",
             "name": "eighty"},
            {"feature_id": "credits", "threshold": 0, "threshold_type": "remaining",
             "basis": "recurring"},
        ]},
    )
    first, second = updated.billing_controls.usage_alerts
    assert (first.feature_id, first.threshold, first.threshold_type, first.name,
            first.enabled, first.basis, first.source) == (
        "credits", 80, "usage_percentage", "eighty", True, "balance", "customer")
    assert (second.threshold, second.threshold_type, second.basis, second.source) == (
        0, "remaining", "recurring", "customer")
    got = admin.customers.get(customer_id=cid)
    assert [a.name for a in got.billing_controls.usage_alerts] == ["eighty", None]
    # Naming usage_limits only leaves the alerts.
    status, raw = post_raw("/v1/customers.update", {"customer_id": cid, "billing_controls": {
        "usage_limits": [{"feature_id": "premium_message", "limit": 5, "interval": "day"}]}})
    assert status == 200, raw
    assert len(raw["billing_controls"]["usage_alerts"]) == 2


@pytest.mark.skipif(
    os.environ.get("CREDITGATE_TEST_LEDGER", "1") == "1",
    reason="this engine keeps usage alerts: the refusal is the Redis engine's",
)
def test_usage_alerts_are_refused_whole_on_a_store_without_them(admin):
    cid = "sdk-" + uuid.uuid4().hex
    admin.customers.get_or_create(customer_id=cid)
    admin.billing.attach(customer_id=cid, plan_id="pro")
    status, raw = post_raw("/v1/customers.update", {"customer_id": cid, "billing_controls": {
        "usage_limits": [{"feature_id": "premium_message", "limit": 5, "interval": "day"}],
        "usage_alerts": [{"feature_id": "credits", "threshold": 150, "threshold_type": "usage"}]}})
    assert (status, raw["code"]) == (400, "alerts_unsupported"), raw
    _, raw = post_raw("/v1/customers.get", {"customer_id": cid})
    assert raw["billing_controls"]["usage_limits"] == [], "nothing applied"
    assert raw["billing_controls"]["usage_alerts"] == []
