-- creditgate shared rules (layout cg1). Prepended to every operation script
-- at load time; never copy these rules into a script by hand.
--
-- This file is the line-by-line twin of src/rules.rs, src/money.rs and
-- src/calendar.rs; the differential test (tests/differential.rs) holds the
-- two to identical answers. Where the form differs from the Rust, a comment
-- says why (see also lua/README.md, "Where the Lua differs in form").
--
-- Numbers are doubles: exact for integers below 2^53, which every stored
-- value respects (amounts |x| <= 10^15 raw, costs <= 10^12 raw, instants
-- <= 253402300799999). Products that may exceed 2^53 go through muldiv,
-- which is exact. Integers are written with string.format('%d'), never with
-- tostring or '..' on a number.

local MAX = 1000000000000000 -- largest |amount| raw (10^11 x 10^4)
local HUGE = 9007199254740992 -- 2^53: "more than any balance"
local SCALE = 1000000 -- cost scale (10^6)
local INF = math.huge
local MINUTE = 60000
local HOUR = 3600000
local DAY = 86400000
local NOMINAL_MONTH = 31 * DAY
local MAX_INSTANT = 253402300799999
local MAX_BUCKETS = 64
local ROLLOVER_WINDOW = 66
local US = '\31' -- field separator inside stored values (ids hold no control chars)
local RS = '\30' -- row separator
local CUSTOMER_FIELD = '\31' -- the customer record's field in the customer hash
local ROWS_SUFFIX = '\31r' -- a bucket's rollover rows: field <balance id>\31r

-- Positions inside the msgpack arrays stored in Redis (never renumber: they
-- are stored bytes). A pending lock, one field of the lock hash:
local LOCK = { FEATURE = 1, UNITS = 2, EXPIRES_AT = 3, POOLS = 4, HELD = 5 }
-- one held entry of a lock (a source it took from, and that bucket's
-- next_reset_at at hold time: a bucket that has reset since gets nothing back):
local HELD = { BALANCE_ID = 1, POOL = 2, KIND = 3, ROLLOVER_EXPIRES_AT = 4, AMOUNT = 5, UNITS = 6, NEXT_RESET_AT = 7 }
-- a pool the lock was reserved from:
local POOL = { ID = 1, COST = 2 }
-- a finalized lock's receipt (key <customer key>:f:<lock id>):
local RECEIPT = { FORGET_AT = 1, FEATURE = 2, OUTCOME = 3, POOLS = 4 }
-- an idempotency record (key <customer key>:i:<key>):
local RECORD = { FINGERPRINT = 1, EXPIRES_AT = 2, OUTCOME = 3 }
-- a stored outcome, and one of its entries:
local PACKED = { ALLOWED = 1, UNCOVERED = 2, NO_BALANCE = 3, INSUFFICIENT = 4, ENTRIES = 5 }
local ENTRY = { BALANCE_ID = 1, POOL = 2, KIND = 3, ROLLOVER_EXPIRES_AT = 4, AMOUNT = 5, UNITS = 6 }

local function fail(code, detail)
  error({ cg = detail and (code .. ' ' .. detail) or code })
end

-- Runs an operation; typed failures become `-CG <code> [detail]` replies.
local function run_main(main)
  local ok, res = pcall(main)
  if ok then
    return res
  end
  if type(res) == 'table' and res.cg then
    return redis.error_reply('CG ' .. res.cg)
  end
  error(res)
end

local function fmt(n)
  return string.format('%d', n)
end

local function opt(n)
  if n == nil then
    return ''
  end
  return fmt(n)
end

local function num(s)
  if s == nil or s == '' then
    return nil
  end
  local n = tonumber(s)
  if n == nil then
    fail('invalid_inputs', 'argument not a number')
  end
  return n
end

local function split(s, sep)
  local out, i = {}, 1
  while true do
    local j = string.find(s, sep, i, true)
    if not j then
      out[#out + 1] = string.sub(s, i)
      return out
    end
    out[#out + 1] = string.sub(s, i, j - 1)
    i = j + 1
  end
end

local function min(a, b)
  if a < b then
    return a
  end
  return b
end

local function max(a, b)
  if a > b then
    return a
  end
  return b
end

local function opt_min(a, b)
  if a == nil then
    return b
  end
  if b == nil then
    return a
  end
  return min(a, b)
end

---------------------------------------------------------------------------
-- Exact arithmetic (twin of the i128 products in src/money.rs).
-- Non-negative integers below 2^53 as little-endian limbs of base 10^7:
-- a limb product is below 10^14 and a column sum stays far below 2^53.
---------------------------------------------------------------------------
local BASE = 10000000

local function bn(x)
  local t, i = {}, 1
  repeat
    local r = x % BASE
    t[i] = r
    x = (x - r) / BASE
    i = i + 1
  until x == 0
  return t
end

local function bn_mul(a, b)
  local r = {}
  for i = 1, #a + #b do
    r[i] = 0
  end
  for i = 1, #a do
    for j = 1, #b do
      r[i + j - 1] = r[i + j - 1] + a[i] * b[j]
    end
  end
  local carry = 0
  for i = 1, #r do
    local v = r[i] + carry
    local lo = v % BASE
    r[i] = lo
    carry = (v - lo) / BASE
  end
  while #r > 1 and r[#r] == 0 do
    r[#r] = nil
  end
  return r
end

local function bn_cmp(a, b)
  if #a ~= #b then
    return #a < #b and -1 or 1
  end
  for i = #a, 1, -1 do
    if a[i] ~= b[i] then
      return a[i] < b[i] and -1 or 1
    end
  end
  return 0
end

-- floor(a*b/c) exactly, for 0 <= a, b < 2^53 and 0 < c < 2^53; HUGE when
-- the quotient is 2^53 or more. Second result: whether the division is exact.
local function muldiv(a, b, c)
  local p = a * b
  if p < 9.0e15 then -- the double product is exact below 2^53
    local q = math.floor(p / c)
    return q, q * c == p
  end
  local q = math.floor(p / c)
  if q >= HUGE - 8 then
    return HUGE, false
  end
  local P = bn_mul(bn(a), bn(b))
  local C = bn(c)
  while q > 0 and bn_cmp(bn_mul(bn(q), C), P) > 0 do
    q = q - 1
  end
  while bn_cmp(bn_mul(bn(q + 1), C), P) <= 0 do
    q = q + 1
  end
  return q, bn_cmp(bn_mul(bn(q), C), P) == 0
end

-- money::charge: ceil(units * cost / 10^6), units >= 0. HUGE when past 2^53.
local function charge(units, cost)
  if cost == SCALE then
    return units
  end
  local q, exact = muldiv(units, cost, SCALE)
  if q >= HUGE then
    return HUGE
  end
  if exact then
    return q
  end
  return q + 1
end

-- money::affordable_units: floor(available * 10^6 / cost), 0 when available <= 0.
local function affordable(available, cost)
  if available <= 0 then
    return 0
  end
  if cost == SCALE then
    return available
  end
  return (muldiv(available, SCALE, cost))
end

-- money::cover: the units of `need` a source with `available` covers, and its charge.
local function cover(need, available, cost)
  local units = max(min(need, affordable(available, cost)), 0)
  return units, charge(units, cost)
end

---------------------------------------------------------------------------
-- Calendar (twin of src/calendar.rs). Every division below has a positive
-- divisor, so math.floor(a / b) is Rust's div_euclid, and it is exact for
-- integers below 2^53.
---------------------------------------------------------------------------
local function is_leap(y)
  return (y % 4 == 0 and y % 100 ~= 0) or y % 400 == 0
end

local MONTH_DAYS = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 }

local function days_in_month(y, m)
  if m == 2 and is_leap(y) then
    return 29
  end
  return MONTH_DAYS[m]
end

local function days_from_civil(y, m, d)
  if m <= 2 then
    y = y - 1
  end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_ms(t)
  local days = math.floor(t / DAY)
  local tod = t - days * DAY
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m
  if mp < 10 then
    m = mp + 3
  else
    m = mp - 9
  end
  local y = yoe + era * 400
  if m <= 2 then
    y = y + 1
  end
  return y, m, d, tod
end

local function add_months(t, months)
  local y, m, d, tod = civil_from_ms(t)
  local total = y * 12 + (m - 1) + months
  local ny = math.floor(total / 12)
  local nm = total - ny * 12 + 1
  local nd = min(d, days_in_month(ny, nm))
  return days_from_civil(ny, nm, nd) * DAY + tod
end

-- Interval codes as stored: 0 one_off, 1 minute, 2 hour, 3 day, 4 week,
-- 5 month, 6 quarter, 7 semi_annual, 8 year.
local INTERVAL_NAMES = { [0] = 'one_off', 'minute', 'hour', 'day', 'week', 'month', 'quarter', 'semi_annual', 'year' }
local STEP_MS = { [1] = MINUTE, [2] = HOUR, [3] = DAY, [4] = 7 * DAY }
local STEP_MONTHS = { [5] = 1, [6] = 3, [7] = 6, [8] = 12 }

-- calendar::Period::new: nil for one_off; else { ms = n } or { months = n }.
local PERIODS = {}

local function make_period(code, count)
  local key = code * 10000 + count
  local p = PERIODS[key]
  if p ~= nil then
    return p or nil
  end
  p = nil
  if STEP_MS[code] then
    p = { ms = STEP_MS[code] * count }
  elseif STEP_MONTHS[code] then
    p = { months = STEP_MONTHS[code] * count }
  end
  PERIODS[key] = p or false
  return p
end

local function nominal_ms(p)
  if p.ms then
    return p.ms
  end
  return p.months * NOMINAL_MONTH
end

local function boundary(p, anchor, index)
  if p.ms then
    return anchor + index * p.ms
  end
  return add_months(anchor, index * p.months)
end

local function last_index_at_or_before(p, anchor, t)
  local i
  if p.ms then
    i = math.floor((t - anchor) / p.ms)
  else
    local ya, ma = civil_from_ms(anchor)
    local yt, mt = civil_from_ms(t)
    i = math.floor(((yt - ya) * 12 + (mt - ma)) / p.months)
  end
  while boundary(p, anchor, i + 1) <= t do
    i = i + 1
  end
  while boundary(p, anchor, i) > t do
    i = i - 1
  end
  return i
end

---------------------------------------------------------------------------
-- Storage codecs. A bucket is one hash field <balance id> whose value holds
-- \31-separated fields (trailing empty ones dropped):
--   seq, pool, granted, remaining, interval code ('' = 0, one_off),
--   count ('' = 1), anchor,
--   next boundary index, expires_at, flags (u unlimited, o overage allowed,
--   d carry debt), overage floor, rollover ("max/pct/len", len '' = forever),
--   plan id.
-- Differs in form from the Rust: the next reset is kept as the index of the
-- boundary (next_reset_at = min(boundary(anchor, index), MAX_INSTANT + 1)),
-- which is shorter than an instant and gives the same value.
-- Its live rollover rows, when it has any, are the field <balance id>\31r:
-- rows "expires_at,granted,balance" (expires_at '' = never) joined by \30,
-- oldest first.
---------------------------------------------------------------------------
-- Stored integers are written in base 36 (digits 0-9a-z, '-' for negatives):
-- a 13-digit instant takes 8 characters, which keeps a customer's hash small
-- enough for Redis's compact encoding. Exact below 2^53 both ways.
-- A literal, not a loop: this chunk runs on every call.
local DIGIT36 = {
  [0] = '0', '1', '2', '3', '4', '5', '6', '7', '8', '9',
  'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm',
  'n', 'o', 'p', 'q', 'r', 's', 't', 'u', 'v', 'w', 'x', 'y', 'z',
}

local function e36(n)
  if n == 0 then
    return '0'
  end
  local sign = ''
  if n < 0 then
    sign, n = '-', -n
  end
  local t, i = {}, 12 -- 36^11 > 2^53: at most 11 digits
  while n > 0 do
    local r = n % 36
    t[i] = DIGIT36[r]
    i = i - 1
    n = (n - r) / 36
  end
  return sign .. table.concat(t, '', i + 1, 12)
end

local function o36(n)
  if n == nil then
    return ''
  end
  return e36(n)
end

local function d36(s)
  if s == nil or s == '' then
    return nil
  end
  if string.sub(s, 1, 1) == '-' then
    return -tonumber(string.sub(s, 2), 36)
  end
  return tonumber(s, 36)
end

-- Memoized per boundary index: a request asks it several times per bucket
-- (due score on load and save, resets, views), and a calendar boundary costs
-- a civil-date round trip.
local function next_reset_at(b)
  if b.idx == nil then
    return nil
  end
  if b.nra_idx ~= b.idx then
    b.nra_idx, b.nra = b.idx, min(boundary(b.period, b.anchor, b.idx), MAX_INSTANT + 1)
  end
  return b.nra
end

local function decode_rows(s)
  local rows = {}
  if s == nil or s == '' then
    return rows
  end
  for _, r in ipairs(split(s, RS)) do
    local f = split(r, ',')
    rows[#rows + 1] = { exp = d36(f[1]), granted = d36(f[2]), balance = d36(f[3]) }
  end
  return rows
end

local function encode_rows(rows)
  local parts = {}
  for i, r in ipairs(rows) do
    parts[i] = o36(r.exp) .. ',' .. e36(r.granted) .. ',' .. e36(r.balance)
  end
  return table.concat(parts, RS)
end

local function decode_bucket(id, s, rows)
  local f = split(s, US)
  local code = d36(f[5]) or 0
  local count = d36(f[6]) or 1
  local flags = f[10] or ''
  local b = {
    id = id,
    seq = d36(f[1]),
    pool = f[2],
    granted = d36(f[3]),
    remaining = d36(f[4]),
    code = code,
    count = count,
    period = make_period(code, count),
    anchor = d36(f[7]) or 0,
    idx = d36(f[8]),
    expires = d36(f[9]),
    unlimited = string.find(flags, 'u', 1, true) ~= nil,
    overage = string.find(flags, 'o', 1, true) ~= nil,
    carry = string.find(flags, 'd', 1, true) ~= nil,
    floor = d36(f[11]),
    plan = f[13],
    rows = decode_rows(rows),
  }
  -- Only remaining, the next boundary index and the rows ever change once a
  -- bucket exists; save() re-encodes a bucket only when they did.
  b.stored_remaining, b.stored_idx = b.remaining, b.idx
  if b.plan == '' then
    b.plan = nil
  end
  if f[12] ~= nil and f[12] ~= '' then
    local r = split(f[12], '/')
    b.ro = { max = d36(r[1]), pct = d36(r[2]), len = d36(r[3]) }
  end
  return b
end

local function encode_bucket(b)
  local flags = (b.unlimited and 'u' or '') .. (b.overage and 'o' or '') .. (b.carry and 'd' or '')
  local ro = ''
  if b.ro then
    ro = o36(b.ro.max) .. '/' .. o36(b.ro.pct) .. '/' .. o36(b.ro.len)
  end
  local f = {
    e36(b.seq),
    b.pool,
    e36(b.granted),
    e36(b.remaining),
    b.code == 0 and '' or e36(b.code),
    b.count == 1 and '' or e36(b.count),
    b.period and e36(b.anchor) or '',
    o36(b.idx),
    o36(b.expires),
    flags,
    o36(b.floor),
    ro,
    b.plan or '',
  }
  local n = #f
  while n > 1 and f[n] == '' do
    f[n] = nil
    n = n - 1
  end
  return table.concat(f, US)
end

-- rules.rs works on a copy of the buckets and commits by assignment; here
-- the same all-or-nothing is an undo record. A request changes only each
-- bucket's `remaining` and its rollover rows' balances, so those are noted
-- before and put back to undo (cheaper than copying every bucket).
local function snapshot(buckets)
  local rem, rows = {}, {}
  for i, b in ipairs(buckets) do
    rem[i] = b.remaining
    if #b.rows > 0 then
      local bal = {}
      for j, r in ipairs(b.rows) do
        bal[j] = r.balance
      end
      rows[i] = bal
    end
  end
  return { rem = rem, rows = rows }
end

local function restore(buckets, snap)
  for i, b in ipairs(buckets) do
    b.remaining = snap.rem[i]
    local bal = snap.rows[i]
    if bal then
      for j, r in ipairs(b.rows) do
        r.balance = bal[j]
      end
    end
  end
end

---------------------------------------------------------------------------
-- The customer: its hash (record + buckets), its pending locks, and writes
-- collected until the end of the script (nothing is written before the
-- operation has succeeded, so an error leaves every key as it was).
---------------------------------------------------------------------------
local function now_arg(s)
  if s ~= nil and s ~= '' then
    return tonumber(s)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function bucket_due(b)
  return opt_min(opt_min(next_reset_at(b), b.expires), (b.rows[1] or {}).exp)
end

-- The due-index score: the earliest instant something changes by itself.
local function due_score(C)
  local s = C.le
  for _, b in ipairs(C.buckets) do
    s = opt_min(s, bucket_due(b))
    for _, r in ipairs(b.rows) do
      s = opt_min(s, r.exp)
    end
  end
  return s
end

local function load_customer(keys, now, ret_idem, ret_lock)
  local raw = redis.call('HGETALL', keys[1])
  if #raw == 0 then
    fail('customer_not_found')
  end
  local fields = {}
  for i = 1, #raw, 2 do
    fields[raw[i]] = raw[i + 1]
  end
  local rec = fields[CUSTOMER_FIELD]
  if rec == nil then
    fail('customer_not_found')
  end
  local r = split(rec, US)
  local C = {
    key = keys[1],
    lock_key = keys[2],
    due_key = keys[3],
    now = now,
    ret_idem = ret_idem,
    ret_lock = ret_lock,
    created_at = d36(r[1]),
    next_seq = d36(r[2]),
    le = d36(r[3]),
    rec = rec,
    fields = fields,
    buckets = {},
    locks = {}, -- lock id -> decoded pending lock, or false once removed
    lock_dirty = {},
    receipts = {}, -- lock id -> receipt to write
    receipt_del = {},
  }
  for f, v in pairs(fields) do
    if f ~= CUSTOMER_FIELD and string.find(f, US, 1, true) == nil then
      C.buckets[#C.buckets + 1] = decode_bucket(f, v, fields[f .. ROWS_SUFFIX])
    end
  end
  -- The Rust keeps buckets in creation order; so does this list.
  table.sort(C.buckets, function(a, b)
    return a.seq < b.seq
  end)
  C.due0 = due_score(C)
  return C
end

local function encode_record(C)
  local f = e36(C.created_at) .. US .. e36(C.next_seq)
  if C.le then
    f = f .. US .. e36(C.le)
  end
  return f
end

-- Locks: a pending lock is one field of the lock hash, msgpack of
-- { feature, units, expires_at|false, pools, held } (positions: LOCK), pools =
-- { {pool, cost}... } (POOL), held = { {balance_id, pool, kind, rollover
-- expiry|false, amount, units, next_reset_at|false}... } (HELD).
local function get_lock(C, id)
  local l = C.locks[id]
  if l ~= nil then
    return l or nil
  end
  local v = redis.call('HGET', C.lock_key, id)
  if not v then
    C.locks[id] = false
    return nil
  end
  l = cmsgpack.unpack(v)
  C.locks[id] = l
  return l
end

local function set_lock(C, id, l)
  C.locks[id] = l or false
  C.lock_dirty[id] = true
end

-- Finalized locks are kept as their own key <customer key>:f:<lock id> with a
-- relative expiry (PX); inside, msgpack { forget_at, feature, outcome, pools }
-- (positions: RECEIPT).
local function receipt_key(C, id)
  return C.key .. ':f:' .. id
end

local function get_receipt(C, id)
  local r = C.receipts[id]
  if r == nil and not C.receipt_del[id] then
    local v = redis.call('GET', receipt_key(C, id))
    if v then
      r = cmsgpack.unpack(v)
    end
  end
  if r and r[RECEIPT.FORGET_AT] > C.now then
    return r
  end
  return nil
end

-- The earliest expiry of the pending locks left (after a finalize removed one).
local function recompute_le(C)
  local raw = redis.call('HGETALL', C.lock_key)
  local le = nil
  for i = 1, #raw, 2 do
    local id = raw[i]
    local l = C.locks[id]
    if l == nil then
      l = cmsgpack.unpack(raw[i + 1])
    end
    if l and l[LOCK.EXPIRES_AT] then
      le = opt_min(le, l[LOCK.EXPIRES_AT])
    end
  end
  for id, l in pairs(C.locks) do
    if l and l[LOCK.EXPIRES_AT] and C.lock_dirty[id] then
      le = opt_min(le, l[LOCK.EXPIRES_AT])
    end
  end
  C.le = le
end

local function save(C)
  local hset, hdel = {}, {}
  local rec = encode_record(C)
  if rec ~= C.rec then
    hset[#hset + 1] = CUSTOMER_FIELD
    hset[#hset + 1] = rec
  end
  local kept = {}
  for _, b in ipairs(C.buckets) do
    kept[b.id] = true
    if C.fields[b.id] == nil or b.remaining ~= b.stored_remaining or b.idx ~= b.stored_idx then
      local v = encode_bucket(b)
      if v ~= C.fields[b.id] then
        hset[#hset + 1] = b.id
        hset[#hset + 1] = v
      end
    end
    local old = C.fields[b.id .. ROWS_SUFFIX]
    if #b.rows == 0 then
      if old then
        hdel[#hdel + 1] = b.id .. ROWS_SUFFIX
      end
    else
      local rows = encode_rows(b.rows)
      if rows ~= old then
        hset[#hset + 1] = b.id .. ROWS_SUFFIX
        hset[#hset + 1] = rows
      end
    end
  end
  for f, _ in pairs(C.fields) do
    if f ~= CUSTOMER_FIELD and string.find(f, US, 1, true) == nil and not kept[f] then
      hdel[#hdel + 1] = f
      if C.fields[f .. ROWS_SUFFIX] then
        hdel[#hdel + 1] = f .. ROWS_SUFFIX
      end
    end
  end
  if #hset > 0 then
    redis.call('HSET', C.key, unpack(hset))
  end
  if #hdel > 0 then
    redis.call('HDEL', C.key, unpack(hdel))
  end
  for id, _ in pairs(C.lock_dirty) do
    local l = C.locks[id]
    if l then
      redis.call('HSET', C.lock_key, id, cmsgpack.pack(l))
    else
      redis.call('HDEL', C.lock_key, id)
    end
  end
  for id, _ in pairs(C.receipt_del) do
    if not C.receipts[id] then
      redis.call('DEL', receipt_key(C, id))
    end
  end
  for id, r in pairs(C.receipts) do
    redis.call('SET', receipt_key(C, id), cmsgpack.pack(r), 'PX', max(1, C.ret_lock))
  end
  local due = due_score(C)
  if due ~= C.due0 then
    local member = C.member
    if due == nil then
      redis.call('ZREM', C.due_key, member)
    else
      redis.call('ZADD', C.due_key, due, member)
    end
  end
end

---------------------------------------------------------------------------
-- Deduction order (rules::bucket_order_key, rules::deduction_order).
---------------------------------------------------------------------------
-- Sort keys of rules::bucket_order_key, computed once per bucket (not per
-- comparison): pool index, never resets, nominal period, expiry (none last), seq.
local function order_member(b, pi)
  return {
    b = b,
    pi = pi,
    never = b.period == nil and 1 or 0,
    nominal = b.period and nominal_ms(b.period) or 0,
    exp = b.expires or INF,
    seq = b.seq,
  }
end

local function order_less(a, b)
  if a.pi ~= b.pi then
    return a.pi < b.pi
  end
  if a.never ~= b.never then
    return a.never < b.never
  end
  if a.nominal ~= b.nominal then
    return a.nominal < b.nominal
  end
  if a.exp ~= b.exp then
    return a.exp < b.exp
  end
  return a.seq < b.seq
end

local function pool_index(pools, name)
  for i, p in ipairs(pools) do
    if p.pool == name then
      return i
    end
  end
  return nil
end

local function deduction_order(buckets, pools)
  local members = {}
  for _, b in ipairs(buckets) do
    local pi = pool_index(pools, b.pool)
    if pi then
      members[#members + 1] = order_member(b, pi)
    end
  end
  table.sort(members, order_less)
  local order = { unlimited = {}, rollovers = {}, buckets = {} }
  local rolls = {}
  for rank, m in ipairs(members) do
    local cost = pools[m.pi].cost
    if m.b.unlimited then
      order.unlimited[#order.unlimited + 1] = { b = m.b, kind = 'b', cost = cost }
    else
      order.buckets[#order.buckets + 1] = { b = m.b, kind = 'b', cost = cost }
      for ri, row in ipairs(m.b.rows) do
        rolls[#rolls + 1] = { key1 = row.exp or INF, rank = rank, ri = ri, src = { b = m.b, kind = 'r', exp = row.exp, cost = cost } }
      end
    end
  end
  table.sort(rolls, function(x, y)
    if x.key1 ~= y.key1 then
      return x.key1 < y.key1
    end
    if x.rank ~= y.rank then
      return x.rank < y.rank
    end
    return x.ri < y.ri
  end)
  for i, r in ipairs(rolls) do
    order.rollovers[i] = r.src
  end
  return order
end

-- The sources refer to bucket tables; a dry run is undone with restore().
local function row_of(b, exp)
  for _, r in ipairs(b.rows) do
    if r.exp == exp then
      return r
    end
  end
  return nil
end

-- rules::record: adds to an entry list, merging entries of one source.
-- An entry: { bid, pool, kind 'b'|'r', exp (rollover expiry, nil = never), amount, units }.
local function record(entries, src, amount, units)
  if amount == 0 and units == 0 then
    return
  end
  for _, e in ipairs(entries) do
    if e.bid == src.b.id and e.kind == src.kind and e.exp == src.exp then
      e.amount = e.amount + amount
      e.units = e.units + units
      return
    end
  end
  entries[#entries + 1] = { bid = src.b.id, pool = src.b.pool, kind = src.kind, exp = src.exp, amount = amount, units = units }
end

local function bucket_floor(b)
  if not b.overage then
    return 0
  end
  return b.floor or -MAX
end

-- rules::deduct
local function deduct(order, units)
  local entries = {}
  local src = order.unlimited[1]
  if src then
    local paid = charge(units, src.cost)
    local nxt = src.b.remaining - paid
    if nxt < -MAX or nxt > MAX then
      fail('amount_out_of_range')
    end
    src.b.remaining = nxt
    record(entries, src, paid, units)
    return entries, 0
  end
  local need = units
  local passes = { order.rollovers, order.buckets }
  for _, list in ipairs(passes) do
    for _, s in ipairs(list) do
      if need == 0 then
        break
      end
      local available
      local row
      if s.kind == 'b' then
        available = max(s.b.remaining, 0)
      else
        row = row_of(s.b, s.exp)
        available = row and row.balance or 0
      end
      local took, paid = cover(need, available, s.cost)
      if took > 0 then
        if s.kind == 'b' then
          s.b.remaining = s.b.remaining - paid
        elseif row then
          row.balance = row.balance - paid
        end
        need = need - took
        record(entries, s, paid, took)
      end
    end
  end
  for _, s in ipairs(order.buckets) do
    if need == 0 then
      break
    end
    if s.b.overage then
      local available = s.b.remaining - bucket_floor(s.b)
      local took, paid = cover(need, available, s.cost)
      if took > 0 then
        s.b.remaining = s.b.remaining - paid
        need = need - took
        record(entries, s, paid, took)
      end
    end
  end
  return entries, need
end

-- rules::overflow
local function overflow(order, entries, units)
  local src = order.buckets[1]
  if not src then
    return units
  end
  local paid = charge(units, src.cost)
  local nxt = src.b.remaining - paid
  if nxt < -MAX or nxt > MAX then
    fail('amount_out_of_range')
  end
  src.b.remaining = nxt
  record(entries, src, paid, units)
  return 0
end

-- rules::refund
local function refund(order, units)
  local entries = {}
  local src = order.unlimited[1]
  if src then
    local b = src.b
    local room = max(b.granted - b.remaining, 0)
    local back = min(charge(units, src.cost), room)
    b.remaining = b.remaining + back
    record(entries, src, -back, -units)
    return entries, 0
  end
  local need = units
  for _, heal in ipairs({ true, false }) do
    for _, s in ipairs(order.buckets) do
      if need == 0 then
        break
      end
      local r = s.b.remaining
      local room
      if heal then
        room = -r
      elseif r >= 0 then
        room = s.b.granted - r
      else
        room = 0
      end
      local took, back = cover(need, room, s.cost)
      if took > 0 then
        s.b.remaining = r + back
        need = need - took
        record(entries, s, -back, -took)
      end
    end
  end
  return entries, need
end

---------------------------------------------------------------------------
-- Resets (rules::reset_bucket and its helpers).
---------------------------------------------------------------------------
-- r(j): remaining after j idle boundaries. j*g may pass 2^53; it is then
-- far above g - r0 (<= 2*10^15), so the min is g, as in the Rust.
local function remaining_after(r0, g, carry, j)
  if j == 0 then
    return r0
  elseif carry and r0 < 0 then
    return min(g, r0 + j * g)
  end
  return g
end

-- Sum of max(0, r(j)) for j < k, clamped to MAX by the caller. A double sum
-- is exact while it stays below 2^53, and above MAX it only needs to stay
-- above MAX, which rounding preserves.
local function rolled_total(r0, g, carry, k)
  local first = max(r0, 0)
  if k <= 1 then
    return first
  end
  if not (carry and r0 < 0) then
    return first + (k - 1) * g
  end
  if g == 0 then
    return 0
  end
  local jp = math.floor(-r0 / g) + 1
  if jp > k - 1 then
    return 0
  end
  return remaining_after(r0, g, true, jp) + ((k - 1) - jp) * g
end

-- rollover cap: max, or floor(granted * pct / 10^6) (pct raw at 4 digits, /100)
local function rollover_cap(b)
  if b.ro.max then
    return b.ro.max
  end
  if b.ro.pct then
    return (muldiv(b.granted, b.ro.pct, 1000000))
  end
  return nil
end

-- rules::fill: newest-first rows -> kept rows (oldest first), capped.
local function fill(newest_first, cap)
  local merged = {}
  for _, row in ipairs(newest_first) do
    local last = merged[#merged]
    if last and last.exp == row.exp then
      last.granted = min(last.granted + row.granted, MAX)
      last.balance = min(last.balance + row.balance, MAX)
    else
      merged[#merged + 1] = { exp = row.exp, granted = row.granted, balance = row.balance }
    end
  end
  local room = cap
  local kept = {}
  for _, row in ipairs(merged) do
    local keep = max(min(row.balance, room), 0)
    local trimmed = row.balance - keep
    room = room - keep
    if keep ~= 0 then
      row.balance = keep
      row.granted = max(row.granted - trimmed, keep)
      kept[#kept + 1] = row
    end
  end
  local out = {}
  for i = #kept, 1, -1 do
    out[#out + 1] = kept[i]
  end
  return out
end

local function reset_bucket(b, now)
  local nxt = next_reset_at(b)
  if b.period == nil or nxt == nil or nxt > now then
    return false
  end
  local p = b.period
  -- The Rust computes first = last_index_at_or_before(anchor, next_reset_at);
  -- next_reset_at is boundary(anchor, idx) and not clamped here, so first = idx.
  local first = b.idx
  local last = last_index_at_or_before(p, b.anchor, now)
  local k = last - first + 1
  local r0, g = b.remaining, b.granted
  local carry = b.carry and not b.unlimited
  if b.ro then
    local cap = min(rollover_cap(b) or MAX, MAX)
    local rows = {}
    if b.ro.len then
      for j = k, max(1, k - ROLLOVER_WINDOW + 1), -1 do
        local bnd = boundary(p, b.anchor, first + j - 1)
        local expires = add_months(bnd, b.ro.len)
        local amount = max(remaining_after(r0, g, carry, j - 1), 0)
        if expires > now and amount > 0 then
          rows[#rows + 1] = { exp = expires, granted = amount, balance = amount }
        end
      end
      for i = #b.rows, 1, -1 do
        local r = b.rows[i]
        if r.exp == nil or r.exp > now then
          rows[#rows + 1] = { exp = r.exp, granted = r.granted, balance = r.balance }
        end
      end
    else
      local added = min(rolled_total(r0, g, carry, k), MAX)
      local og, ob = 0, 0
      for _, r in ipairs(b.rows) do
        if r.exp == nil then
          og, ob = r.granted, r.balance
          break
        end
      end
      rows[1] = { exp = nil, granted = min(og + added, MAX), balance = min(ob + added, MAX) }
    end
    b.rows = fill(rows, cap)
  end
  b.remaining = max(min(remaining_after(r0, g, carry, k), MAX), -MAX)
  b.idx = last + 1
  return true
end

---------------------------------------------------------------------------
-- Locks (rules::release_held) and prepare.
---------------------------------------------------------------------------
local function find_bucket(C, id)
  for i, b in ipairs(C.buckets) do
    if b.id == id then
      return b, i
    end
  end
  return nil
end

local function outcome(allowed, entries, uncovered)
  return { allowed = allowed, entries = entries, uncovered = uncovered, nb = false, ins = false }
end

-- rules::release_held over a lock's held entries (positions: HELD).
local function release_held(C, lock, at)
  local entries = {}
  local lost = 0
  for _, h in ipairs(lock[LOCK.HELD]) do
    local bid, kind, exp = h[HELD.BALANCE_ID], h[HELD.KIND], h[HELD.ROLLOVER_EXPIRES_AT] or nil
    local amount, units, marker = h[HELD.AMOUNT], h[HELD.UNITS], h[HELD.NEXT_RESET_AT] or nil
    local b = find_bucket(C, bid)
    local target = nil
    if b and (b.expires == nil or b.expires > at) then
      local n = next_reset_at(b)
      if n == marker and (n == nil or n > at) then
        target = b
      end
    end
    local back = 0
    if target and kind == 'b' then
      back = min(amount, max(target.granted - target.remaining, 0))
      target.remaining = target.remaining + back
    elseif target then
      local row = row_of(target, exp)
      if row and (exp == nil or exp > at) then
        back = min(amount, max(row.granted - row.balance, 0))
        row.balance = row.balance + back
      end
    end
    local u
    if back == amount then
      u = units
    else
      u = (muldiv(units, back, max(amount, 1)))
    end
    lost = lost + units - u
    if back > 0 or u > 0 then
      entries[#entries + 1] = { bid = bid, pool = h[HELD.POOL], kind = kind, exp = exp, amount = -back, units = -u }
    end
  end
  return outcome(true, entries, lost)
end

-- A stored outcome: msgpack-friendly { allowed, uncovered, no_balance,
-- insufficient, entries } (positions: PACKED) with entries { balance_id,
-- pool, kind, rollover expiry|false, amount, units } (positions: ENTRY).
local function pack_outcome(o)
  local es = {}
  for i, e in ipairs(o.entries) do
    es[i] = { e.bid, e.pool, e.kind, e.exp or false, e.amount, e.units }
  end
  return { o.allowed and 1 or 0, o.uncovered, o.nb and 1 or 0, o.ins and 1 or 0, es }
end

local function unpack_outcome(p)
  local es = {}
  for i, e in ipairs(p[PACKED.ENTRIES]) do
    es[i] = {
      bid = e[ENTRY.BALANCE_ID],
      pool = e[ENTRY.POOL],
      kind = e[ENTRY.KIND],
      exp = e[ENTRY.ROLLOVER_EXPIRES_AT] or nil,
      amount = e[ENTRY.AMOUNT],
      units = e[ENTRY.UNITS],
    }
  end
  return {
    allowed = p[PACKED.ALLOWED] == 1,
    uncovered = p[PACKED.UNCOVERED],
    nb = p[PACKED.NO_BALANCE] == 1,
    ins = p[PACKED.INSUFFICIENT] == 1,
    entries = es,
  }
end

-- rules::prepare: expired pending locks are released (each as of its own
-- expiry, in expiry order), expired buckets dropped, due resets applied,
-- expired rollovers dropped. Forgetting records past retention happens
-- where they are read (their stored expiry is compared with now), and Redis
-- deletes them by PX. Returns the number of buckets that reset.
local function prepare(C)
  local now = C.now
  if C.le and C.le <= now then
    local raw = redis.call('HGETALL', C.lock_key)
    local expired, le = {}, nil
    for i = 1, #raw, 2 do
      local id = raw[i]
      local l = cmsgpack.unpack(raw[i + 1])
      C.locks[id] = l
      local e = l[LOCK.EXPIRES_AT] or nil
      if e and e <= now then
        expired[#expired + 1] = { e = e, id = id }
      elseif e then
        le = opt_min(le, e)
      end
    end
    table.sort(expired, function(a, b)
      if a.e ~= b.e then
        return a.e < b.e
      end
      return a.id < b.id
    end)
    for _, x in ipairs(expired) do
      local lock = C.locks[x.id]
      local o = release_held(C, lock, x.e)
      C.receipts[x.id] = { x.e + C.ret_lock, lock[LOCK.FEATURE], pack_outcome(o), lock[LOCK.POOLS] }
      set_lock(C, x.id, nil)
    end
    C.le = le
  end
  local live = {}
  for _, b in ipairs(C.buckets) do
    if b.expires == nil or b.expires > now then
      live[#live + 1] = b
    end
  end
  C.buckets = live
  local resets = 0
  for _, b in ipairs(C.buckets) do
    if reset_bucket(b, now) then
      resets = resets + 1
    end
    local rows = {}
    for _, r in ipairs(b.rows) do
      if r.exp == nil or r.exp > now then
        rows[#rows + 1] = r
      end
    end
    b.rows = rows
  end
  return resets
end

---------------------------------------------------------------------------
-- Requests (rules::check, track, apply).
---------------------------------------------------------------------------
-- The catalog travels in ARGV: npools (-1: unknown feature), then pool,
-- cost pairs in deduction order. Returns nil for an unknown feature.
local function read_pools(argv, at)
  local n = tonumber(argv[at])
  if n == nil or n < 0 then
    return nil
  end
  local pools = {}
  for i = 1, n do
    pools[i] = { pool = argv[at + 2 * i - 1], cost = tonumber(argv[at + 2 * i]) }
  end
  return pools
end

-- rules::owned_pools: FeatureNotFound surfaces here, where the Rust raises it.
local function owned_pools(buckets, pools)
  if pools == nil then
    fail('feature_not_found')
  end
  local owned = {}
  for _, p in ipairs(pools) do
    for _, b in ipairs(buckets) do
      if b.pool == p.pool then
        owned[#owned + 1] = p
        break
      end
    end
  end
  return owned
end

local function no_balance(units, insufficient)
  local o = outcome(false, {}, units < 0 and -units or units)
  o.nb = true
  o.ins = insufficient
  return o
end

-- rules::check on a copy; the copy (with its new balances) is the second result.
local function check(C, pools, units, keep)
  local owned = owned_pools(C.buckets, pools)
  if #owned == 0 then
    return no_balance(units, false)
  end
  local snap = snapshot(C.buckets)
  local order = deduction_order(C.buckets, owned)
  local entries, rest = deduct(order, units)
  if rest > 0 then
    restore(C.buckets, snap)
    return outcome(false, {}, rest)
  end
  if not keep then
    restore(C.buckets, snap)
  end
  return outcome(true, entries, 0)
end
-- rules::track (a negative `units` refunds).
local function track(C, pools, units, behavior)
  local owned = owned_pools(C.buckets, pools)
  if #owned == 0 then
    return no_balance(units, behavior == 'reject' and units > 0)
  end
  local snap = snapshot(C.buckets)
  local order = deduction_order(C.buckets, owned)
  local o
  if units < 0 then
    local entries, rest = refund(order, -units)
    o = outcome(rest == 0, entries, rest)
  else
    local entries, rest = deduct(order, units)
    if rest == 0 then
      o = outcome(true, entries, 0)
    elseif behavior == 'reject' then
      restore(C.buckets, snap)
      o = outcome(false, {}, rest)
      o.ins = true
      return o
    elseif behavior == 'cap' then
      o = outcome(false, entries, rest)
    else
      rest = overflow(order, entries, rest)
      o = outcome(rest == 0, entries, rest)
    end
  end
  return o
end

---------------------------------------------------------------------------
-- Replies. A bucket view:
--   { balance_id, seq, pool, plan_id|'', granted, remaining, interval,
--     interval_count, next_reset_at|'', expires_at|'', unlimited 0|1,
--     overage_allowed 0|1, { rollover expires_at|'', granted, balance, ... } }
-- An outcome:
--   { allowed 0|1, uncovered, flags ('n' no balance, 'i' insufficient,
--     'r' replayed), { { balance_id, pool, 'bucket'|'rollover',
--     rollover expires_at|'', amount, units }... }, feature|'', buckets }
---------------------------------------------------------------------------
local function bucket_view(b)
  local rows = {}
  for _, r in ipairs(b.rows) do
    rows[#rows + 1] = r.exp or ''
    rows[#rows + 1] = r.granted
    rows[#rows + 1] = r.balance
  end
  return {
    b.id,
    b.seq,
    b.pool,
    b.plan or '',
    b.granted,
    b.remaining,
    INTERVAL_NAMES[b.code],
    b.count,
    next_reset_at(b) or '',
    b.expires or '',
    b.unlimited and 1 or 0,
    b.overage and 1 or 0,
    rows,
    b.anchor,
    b.carry and 1 or 0,
  }
end

local function views(C, pools)
  local out = {}
  for _, b in ipairs(C.buckets) do
    if pools == nil or pool_index(pools, b.pool) then
      out[#out + 1] = bucket_view(b)
    end
  end
  return out
end

local function outcome_reply(o, replayed, feature, buckets)
  local es = {}
  for i, e in ipairs(o.entries) do
    es[i] = { e.bid, e.pool, e.kind == 'b' and 'bucket' or 'rollover', e.exp or '', e.amount, e.units }
  end
  local flags = (o.nb and 'n' or '') .. (o.ins and 'i' or '') .. (replayed and 'r' or '')
  return { o.allowed and 1 or 0, o.uncovered, flags, es, feature or '', buckets }
end

-- The standard header of every script on a customer:
-- ARGV[1] now (ms, '' = Redis TIME), ARGV[2] idempotency retention (ms),
-- ARGV[3] finalized-lock retention (ms).
local function open_customer()
  local now = now_arg(ARGV[1])
  local C = load_customer(KEYS, now, tonumber(ARGV[2]), tonumber(ARGV[3]))
  C.member = ARGV[4]
  return C
end
