-- update_bucket: sets a bucket's remaining, or adds to it.
-- KEYS[1] customer hash cg1:{t}   KEYS[2] lock hash cg1:{t}:l   KEYS[3] due index cg1:due:{<slot tag>}
-- ARGV[1] now: ms UTC ('' = Redis TIME)
-- ARGV[2] idempotency_retention_ms: how long an idempotency record is kept
-- ARGV[3] lock_retention_ms: how long a finalized lock is remembered
-- ARGV[4] customer_id: the member of the due index
-- ARGV[5] pool: feature or credit system id
-- ARGV[6] balance_id: '' = the pool's first bucket in deduction order
-- ARGV[7] mode: 'set' | 'add'
-- ARGV[8] amount: raw, x10^4
-- Reply: 1. Errors: balance_not_found, amount_out_of_range.
-- Trusts: the pool is a known feature id.
return run_main(function()
  local C = open_customer()
  prepare(C)
  local members = {}
  for _, b in ipairs(C.buckets) do
    if b.pool == ARGV[5] then
      members[#members + 1] = order_member(b, 1)
    end
  end
  -- rules::update_bucket: the pool's buckets in bucket_order_key order.
  table.sort(members, order_less)
  local target = nil
  for _, m in ipairs(members) do
    if ARGV[6] == '' or m.b.id == ARGV[6] then
      target = m.b
      break
    end
  end
  if not target then
    fail('balance_not_found')
  end
  local v = num(ARGV[8])
  local nxt = v
  if ARGV[7] == 'add' then
    nxt = target.remaining + v
  end
  if nxt < -MAX or nxt > MAX then
    fail('amount_out_of_range')
  end
  target.remaining = nxt
  save(C)
  return 1
end)
