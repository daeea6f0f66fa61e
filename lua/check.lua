-- check: the exact dry run of consume; changes no balance (due resets are applied).
-- KEYS[1] customer hash cg1:{t}   KEYS[2] lock hash cg1:{t}:l   KEYS[3] due index cg1:due:{<slot tag>}
-- ARGV[1] now: ms UTC ('' = Redis TIME)
-- ARGV[2] idempotency_retention_ms: how long an idempotency record is kept
-- ARGV[3] lock_retention_ms: how long a finalized lock is remembered
-- ARGV[4] customer_id: the member of the due index
-- ARGV[5] feature_id: the feature asked for
-- ARGV[6] units: raw, x10^4, >= 0
-- ARGV[7] pool_count: N (-1 = unknown feature)
-- ARGV[8..] pools: N pairs: pool id, cost (raw, x10^6), the feature's own pool
--         (cost 1000000) first, then each credit system containing it
-- Reply: an outcome (see lua/README.md).
return run_main(function()
  local C = open_customer()
  prepare(C)
  local feature, units = ARGV[5], num(ARGV[6])
  local pools = read_pools(ARGV, 7)
  local o = check(C, pools, units)
  save(C)
  return outcome_reply(o, false, feature, views(C, pools))
end)
