-- reset_due: applies due resets, releases expired locks.
-- KEYS[1] customer hash cg1:{t}   KEYS[2] lock hash cg1:{t}:l   KEYS[3] due index cg1:due:{<slot tag>}
-- ARGV[1] now: ms UTC ('' = Redis TIME)
-- ARGV[2] idempotency_retention_ms: how long an idempotency record is kept
-- ARGV[3] lock_retention_ms: how long a finalized lock is remembered
-- ARGV[4] customer_id: the member of the due index
-- Reply: the number of buckets that reset.
return run_main(function()
  local C = open_customer()
  local n = prepare(C)
  save(C)
  return n
end)
