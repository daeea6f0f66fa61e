// The official Autumn JavaScript SDK (autumn-js) against a running creditgate.
// Started by tests/sdk/run.sh (node's test runner), which passes CREDITGATE_URL and keys.
const test = require("node:test");
const assert = require("node:assert/strict");
const { Autumn } = require("autumn-js");

const URL = process.env.CREDITGATE_URL;
const admin = new Autumn({ secretKey: process.env.CREDITGATE_ADMIN_KEY, serverURL: URL, failOpen: false });
const app = new Autumn({ secretKey: process.env.CREDITGATE_APP_KEY, serverURL: URL, failOpen: false });

async function newCustomer() {
  const id = "js-" + Math.random().toString(16).slice(2);
  const c = await admin.customers.getOrCreate({ customerId: id });
  assert.equal(c.id, id);
  const a = await admin.billing.attach({ customerId: id, planId: "pro" });
  assert.equal(a.customerId, id);
  return id;
}

async function remaining(id) {
  const c = await admin.customers.get({ customerId: id });
  return c.balances.credits.remaining;
}

test("check, send_event, lock + finalize, track with Idempotency-Key", async () => {
  const id = await newCustomer();
  const res = await app.check({ customerId: id, featureId: "premium_message" });
  assert.equal(res.allowed, true);
  assert.equal(res.balance.featureId, "credits");
  assert.equal(res.balance.remaining, 200);

  const sent = await app.check({ customerId: id, featureId: "premium_message", sendEvent: true });
  assert.equal(sent.allowed, true);
  assert.equal(await remaining(id), 190);

  const held = await app.check({
    customerId: id, featureId: "basic_message", requiredBalance: 40, sendEvent: true,
    lock: { lockId: "js-job", enabled: true },
  });
  assert.equal(held.allowed, true);
  assert.equal(await remaining(id), 150);
  const fin = await app.balances.finalize({ lockId: "js-job", action: "release" });
  assert.equal(fin.success, true);
  assert.equal(await remaining(id), 190);

  const headers = { "Idempotency-Key": "js-order-1" };
  const t1 = await app.track({ customerId: id, featureId: "basic_message", value: 25 }, { headers });
  assert.equal(t1.balance.remaining, 165);
  const t2 = await app.track({ customerId: id, featureId: "basic_message", value: 25 }, { headers });
  assert.equal(t2.balance.remaining, 165);
  assert.equal(await remaining(id), 165);
  await assert.rejects(app.track({ customerId: id, featureId: "basic_message", value: 26 }, { headers }));
});

test("balances.create and an unknown customer", async () => {
  const id = "js-" + Math.random().toString(16).slice(2);
  await admin.customers.getOrCreate({ customerId: id });
  const created = await admin.balances.create({
    customerId: id, featureId: "basic_message", includedGrant: 10, reset: { interval: "day" },
  });
  assert.equal(created.success, true);
  const res = await app.check({ customerId: id, featureId: "basic_message", requiredBalance: 10 });
  assert.equal(res.allowed, true);
  assert.equal(res.balance.featureId, "basic_message");
  await assert.rejects(app.check({ customerId: id + "-nobody", featureId: "basic_message" }));
});
