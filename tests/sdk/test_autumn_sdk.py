"""The official Autumn Python SDK (autumn-sdk) against a running creditgate.

Every answer is read through the SDK's own models: where the SDK rejects an
answer, our shape is wrong. `fail_open=False`, so a broken server fails.
Started by tests/sdk/run.sh, which passes CREDITGATE_URL and the keys.
"""

import os
import uuid

import pytest
from autumn_sdk import Autumn, models

URL = os.environ["CREDITGATE_URL"]


@pytest.fixture
def admin():
    return Autumn(secret_key=os.environ["CREDITGATE_ADMIN_KEY"], server_url=URL, fail_open=False)


@pytest.fixture
def app():
    return Autumn(secret_key=os.environ["CREDITGATE_APP_KEY"], server_url=URL, fail_open=False)


def sdk_model(obj):
    """The SDK parsed the answer into its own pydantic model."""
    assert type(obj).__module__.startswith("autumn_sdk.models"), type(obj)
    return obj


def new_customer(admin, plan="pro"):
    cid = "sdk-" + uuid.uuid4().hex
    customer = sdk_model(admin.customers.get_or_create(customer_id=cid))
    assert customer.id == cid
    assert customer.balances == {}
    if plan:
        attached = sdk_model(admin.billing.attach(customer_id=cid, plan_id=plan))
        assert attached.customer_id == cid
        assert attached.payment_url is None
    return cid


def credits_remaining(admin, cid):
    return admin.customers.get(customer_id=cid).balances["credits"].remaining


def test_get_or_create_and_attach(admin):
    cid = new_customer(admin)
    again = admin.customers.get_or_create(customer_id=cid)
    bal = again.balances["credits"]
    assert (bal.granted, bal.remaining, bal.usage) == (200, 200, 0)
    assert bal.next_reset_at is not None and bal.next_reset_at > again.created_at
    assert bal.breakdown[0].plan_id == "pro"
    assert bal.breakdown[0].reset.interval == "month"
    # Attaching again changes nothing.
    admin.billing.attach(customer_id=cid, plan_id="pro")
    assert len(admin.customers.get(customer_id=cid).balances["credits"].breakdown) == 1


def test_balances_create_with_reset_and_rollover(admin, app):
    cid = new_customer(admin, plan=None)
    created = admin.balances.create(
        customer_id=cid,
        feature_id="basic_message",
        included_grant=50,
        reset={"interval": "month", "interval_count": 1},
        rollover={"length": 1, "max": 100},
        balance_id="topup",
    )
    assert sdk_model(created).success is True
    res = app.check(customer_id=cid, feature_id="basic_message", required_balance=50)
    assert res.allowed is True
    assert res.balance.feature_id == "basic_message"
    assert res.balance.remaining == 50
    assert res.balances["credits"] is None
    denied = app.check(customer_id=cid, feature_id="basic_message", required_balance=50.5)
    assert denied.allowed is False


def test_check_and_send_event_consume_the_seed(admin, app):
    cid = new_customer(admin)
    res = sdk_model(app.check(customer_id=cid, feature_id="premium_message"))
    assert type(res.balance).__name__ == "Balance"
    assert res.allowed is True
    assert res.balance.feature_id == "credits"
    assert res.balance.remaining == 200  # a plain check changes nothing
    for _ in range(15):
        assert app.check(customer_id=cid, feature_id="premium_message", send_event=True).allowed
    for _ in range(50):
        assert app.check(customer_id=cid, feature_id="basic_message", send_event=True).allowed
    last = app.check(customer_id=cid, feature_id="basic_message", send_event=True)
    assert last.allowed is False
    assert last.balance.remaining == 0
    assert credits_remaining(admin, cid) == 0


def test_check_with_lock_then_finalize(admin, app):
    cid = new_customer(admin)
    held = app.check(
        customer_id=cid,
        feature_id="premium_message",
        required_balance=3,
        send_event=True,
        lock={"lock_id": "job-1", "enabled": True},
    )
    assert held.allowed is True
    assert credits_remaining(admin, cid) == 170
    done = sdk_model(app.balances.finalize(lock_id="job-1", action="confirm", override_value=2))
    assert done.success is True
    assert credits_remaining(admin, cid) == 180

    app.check(customer_id=cid, feature_id="basic_message", required_balance=40, send_event=True,
              lock={"lock_id": "job-2", "enabled": True})
    assert credits_remaining(admin, cid) == 140
    assert app.balances.finalize(lock_id="job-2", action="release").success is True
    assert credits_remaining(admin, cid) == 180


def test_track_with_idempotency_key_header(admin, app):
    cid = new_customer(admin)
    headers = {"Idempotency-Key": "order-42"}
    first = sdk_model(app.track(customer_id=cid, feature_id="basic_message", value=25, http_headers=headers))
    assert first.deductions[0].plan_id == "pro"
    assert first.customer_id == cid
    assert first.value == 25
    assert first.balance.remaining == 175
    assert first.balance.feature_id == "credits"
    again = app.track(customer_id=cid, feature_id="basic_message", value=25.0, http_headers=headers)
    assert again.balance.remaining == 175  # charged once
    assert credits_remaining(admin, cid) == 175
    with pytest.raises(Exception) as err:
        app.track(customer_id=cid, feature_id="basic_message", value=26, http_headers=headers)
    assert "idempotency_key_reused" in str(err.value) or "409" in str(err.value)
    # Exact decimals come back exact, and a refund gives back.
    app.track(customer_id=cid, feature_id="basic_message", value=0.1)
    t = app.track(customer_id=cid, feature_id="basic_message", value=0.2)
    assert t.balance.remaining == 174.7
    refund = app.track(customer_id=cid, feature_id="basic_message", value=-0.3)
    assert refund.balance.remaining == 175


def test_errors_are_raised_not_failed_open(admin, app):
    with pytest.raises(Exception) as err:
        app.check(customer_id="sdk-nobody-" + uuid.uuid4().hex, feature_id="basic_message")
    assert "customer_not_found" in str(err.value) or "404" in str(err.value)
    cid = new_customer(admin)
    with pytest.raises(Exception) as err:
        app.billing.attach(customer_id=cid, plan_id="pro")
    assert "forbidden" in str(err.value) or "403" in str(err.value)


# ---- the usage ledger (issue 14): events.list, events.aggregate, deletes ----

needs_ledger = pytest.mark.skipif(
    os.environ.get("CREDITGATE_TEST_LEDGER", "1") != "1",
    reason="this engine keeps no usage ledger yet (the Redis ledger has not landed): "
    "events.list, events.aggregate and deletes answer 400 ledger_not_configured",
)


@needs_ledger
def test_events_list_pages_newest_first(admin, app):
    cid = new_customer(admin)
    for v in (1, 2, 3):
        app.track(customer_id=cid, feature_id="premium_message", value=v)
    app.track(customer_id=cid, feature_id="premium_message", value=-1)
    page = sdk_model(admin.events.list(customer_id=cid, feature_id="premium_message", limit=3))
    assert [e.value for e in page.list] == [-1, 3, 2]
    assert page.list[0].customer_id == cid and page.list[0].feature_id == "premium_message"
    assert page.list[1].deductions[0].value == 30
    assert page.list[1].deductions[0].feature_id == "credits"
    assert page.next_cursor
    rest = sdk_model(admin.events.list(customer_id=cid, feature_id=["premium_message"], start_cursor=page.next_cursor))
    assert [e.value for e in rest.list] == [1]
    assert rest.next_cursor is None


@needs_ledger
def test_events_aggregate_totals_and_groups(admin, app):
    cid = new_customer(admin)
    app.track(customer_id=cid, feature_id="premium_message", value=2.5)
    app.track(customer_id=cid, feature_id="basic_message", value=4)
    agg = sdk_model(
        admin.events.aggregate(
            customer_id=cid,
            feature_id=["premium_message", "basic_message"],
            range="7d",
            bin_size="day",
            group_by="$plan_id",
        )
    )
    assert agg.total["premium_message"].sum == 2.5
    assert agg.total["premium_message"].count == 1
    assert agg.total["basic_message"].sum == 4
    assert sum(b.values["basic_message"] for b in agg.list) == 4
    assert any(b.grouped_values and b.grouped_values.get("premium_message", {}).get("pro") == 2.5 for b in agg.list)
    # The SDK always sends bin_size (default "day"): ask for hours.
    hourly = sdk_model(admin.events.aggregate(customer_id=cid, feature_id="premium_message", range="24h", bin_size="hour"))
    assert len(hourly.list) in (24, 25)
    assert sum(b.values["premium_message"] for b in hourly.list) == 2.5


@needs_ledger
def test_balances_delete_and_customers_delete(admin, app):
    cid = new_customer(admin)
    app.track(customer_id=cid, feature_id="premium_message", value=1)
    with pytest.raises(Exception) as e:
        admin.balances.delete(customer_id=cid, feature_id="credits")
    assert "balance_in_use" in str(e.value) or "409" in str(e.value)
    admin.balances.create(customer_id=cid, feature_id="basic_message", included_grant=5)
    done = sdk_model(admin.balances.delete(customer_id=cid, feature_id="basic_message"))
    assert done.success is True
    assert "basic_message" not in admin.customers.get(customer_id=cid).balances
    gone = sdk_model(admin.customers.delete(customer_id=cid))
    assert gone.success is True
    with pytest.raises(Exception):
        admin.customers.get(customer_id=cid)
    # Its usage stays on the ledger.
    page = admin.events.list(customer_id=cid)
    assert [ev.value for ev in page.list] == [1]
