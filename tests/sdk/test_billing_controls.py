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
