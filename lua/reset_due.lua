-- reset_due: applies due resets, releases expired locks.
-- KEYS[1] customer hash cg1:{t}   KEYS[2] lock hash cg1:{t}:l   KEYS[3] due index cg1:due:{<slot tag>}
-- ARGV[1] now ('' = TIME)  ARGV[2] idempotency retention ms  ARGV[3] lock retention ms  ARGV[4] customer id
-- Reply: the number of buckets that reset.
return run_main(function()
  local C = open_customer()
  local n = prepare(C)
  save(C)
  return n
end)
