-- grant: adds a bucket to a customer.
-- KEYS[1] customer hash cg1:{t}   KEYS[2] lock hash cg1:{t}:l   KEYS[3] due index cg1:due:{<slot tag>}
-- ARGV[1] now: ms UTC ('' = Redis TIME)
-- ARGV[2] idempotency_retention_ms: how long an idempotency record is kept
-- ARGV[3] lock_retention_ms: how long a finalized lock is remembered
-- ARGV[4] customer_id: the member of the due index
-- ARGV[5] pool: feature or credit system id
-- ARGV[6] balance_id: '' = generate b<seq>
-- ARGV[7] plan_id: '' = none
-- ARGV[8] granted: raw, x10^4
-- ARGV[9] interval: code 0 one_off 1 minute 2 hour 3 day 4 week 5 month 6 quarter 7 semi_annual 8 year
-- ARGV[10] interval_count: '' = 1
-- ARGV[11] next_reset_at: the first boundary ('' = now + one period)
-- ARGV[12] expires_at: '' = never
-- ARGV[13] flags: any of u (unlimited) o (overage allowed) d (carry debt)
-- ARGV[14] overage_floor: raw <= 0 ('' = unbounded)
-- ARGV[15] rollover: '' none, 'month' or 'forever'
-- ARGV[16] rollover_max: raw ('' = none)
-- ARGV[17] rollover_max_percentage: raw (x10^4, '' = none)
-- ARGV[18] rollover_length: months ('' = 1)
-- Reply: the balance id.
-- Trusts: the input rules of model::validate_grant that need no clock or state
-- (ids, bounds, interval, floor, rollover rules); checks the ones that need `now`.
return run_main(function()
  local C = open_customer()
  local now = C.now
  prepare(C)
  local pool, bid, plan = ARGV[5], ARGV[6], ARGV[7]
  local granted = num(ARGV[8])
  local code, count = num(ARGV[9]), num(ARGV[10]) or 1
  local first, expires = num(ARGV[11]), num(ARGV[12])
  local flags = ARGV[13] or ''
  local period = make_period(code, count)
  if first and first <= now then
    fail('invalid_inputs', 'next_reset_at must be in the future')
  end
  if expires then
    if expires <= now then
      fail('invalid_inputs', 'expires_at must be in the future')
    end
    if period and expires < (first or boundary(period, now, 1)) then
      fail('invalid_inputs', 'expires_at must not be before the first reset')
    end
  end
  if bid ~= '' and find_bucket(C, bid) then
    fail('balance_already_exists')
  end
  if #C.buckets >= MAX_BUCKETS then
    fail('too_many_balances')
  end
  local seq = C.next_seq
  if bid == '' then
    local n = seq
    while find_bucket(C, 'b' .. fmt(n)) do
      n = n + 1
    end
    bid = 'b' .. fmt(n)
  end
  local b = {
    id = bid,
    seq = seq,
    pool = pool,
    plan = plan ~= '' and plan or nil,
    granted = granted,
    remaining = granted,
    code = code,
    count = count,
    period = period,
    anchor = 0,
    idx = nil,
    expires = expires,
    unlimited = string.find(flags, 'u', 1, true) ~= nil,
    overage = string.find(flags, 'o', 1, true) ~= nil,
    carry = string.find(flags, 'd', 1, true) ~= nil,
    floor = num(ARGV[14]),
    rows = {},
  }
  if period and first then
    b.anchor, b.idx = first, 0
  elseif period then
    b.anchor, b.idx = now, 1
  end
  if ARGV[15] == 'month' then
    b.ro = { max = num(ARGV[16]), pct = num(ARGV[17]), len = num(ARGV[18]) or 1 }
  elseif ARGV[15] == 'forever' then
    b.ro = { max = num(ARGV[16]), pct = num(ARGV[17]), len = nil }
  end
  C.buckets[#C.buckets + 1] = b
  C.next_seq = seq + 1
  save(C)
  return bid
end)
