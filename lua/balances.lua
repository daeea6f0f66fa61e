-- balances: every bucket of the customer, after due resets.
-- KEYS[1] customer hash cg1:{t}   KEYS[2] lock hash cg1:{t}:l   KEYS[3] due index cg1:due:{<slot tag>}
-- ARGV[1] now: ms UTC ('' = Redis TIME)
-- ARGV[2] idempotency_retention_ms: how long an idempotency record is kept
-- ARGV[3] lock_retention_ms: how long a finalized lock is remembered
-- ARGV[4] customer_id: the member of the due index
-- Reply: { created_at, { bucket view... } } in creation order.
return run_main(function()
  local C = open_customer()
  prepare(C)
  save(C)
  return { C.created_at, views(C, nil) }
end)
