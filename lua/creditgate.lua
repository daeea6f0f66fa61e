#!lua name=creditgate_cg2_v7
local FN = 'cg2_v7_' -- function-name prefix; MUST equal the library name above minus 'creditgate_'
-- creditgate Redis Functions library, storage layout cg2 (contract:
-- lua/README.md). Load with FUNCTION LOAD, call with FCALL.
--
-- The version lives in line 1 (the library name, `creditgate_<layout>_<version>`)
-- and line 2 (the same `<layout>_<version>` as the function prefix): Redis gives
-- a library no way to read its own name, so the prefix must be spelled out;
-- a unit test (src/engine/redis/library.rs) and benches/fcall_cost.sh refuse a
-- file where the two disagree.
--
-- This file is the twin of src/rules.rs, src/money.rs and src/calendar.rs,
-- ported from the cg1 scripts (lua/lib.lua) that the differential test holds
-- to the Rust; what changed is the storage (a pool's buckets in one field, a
-- due instant in the customer record, compact idempotency records) and the
-- hot path that storage allows: a request with nothing due reads only the
-- record and the fields of the pools it may pay from (one HMGET), decodes
-- only those buckets and writes back only what changed (one HSET).
--
-- Redis 7.0 load-time sandbox: the top level of this chunk sees no globals
-- but `redis` (not even `pcall` or `string`), so every library function is
-- bound to a local on the first call (bind()), and constants are literals.
--
-- Numbers are doubles: exact for integers below 2^53, which every stored
-- value respects (amounts |x| <= 10^15 raw, costs <= 10^12 raw, instants
-- <= 253402300799999). Products that may exceed 2^53 go through muldiv.

---------------------------------------------------------------------------
-- Standard library, bound on first use.
---------------------------------------------------------------------------
local floor, find, sub, format, char, gsub, concat, sort, tonumber, unpack, type, byte
local ipairs, pairs, pcall, error, mp_pack, mp_unpack, sha1hex, rcall, error_reply
local match, setmetatable, rawget
local HEX -- 'xx' (two lower-case hex digits) -> that byte
local bound = false

local function bind()
  floor, find, sub, format, char, gsub = math.floor, string.find, string.sub, string.format, string.char, string.gsub
  byte = string.byte
  concat, sort, tonumber, unpack, type = table.concat, table.sort, _G.tonumber, _G.unpack, _G.type
  ipairs, pairs, pcall, error = _G.ipairs, _G.pairs, _G.pcall, _G.error
  mp_pack, mp_unpack, sha1hex = cmsgpack.pack, cmsgpack.unpack, redis.sha1hex
  match, setmetatable, rawget = string.match, _G.setmetatable, _G.rawget
  rcall, error_reply = redis.call, redis.error_reply
  HEX = {}
  for i = 0, 255 do
    HEX[format('%02x', i)] = char(i)
  end
  bound = true
end
local bind_pairs -- set below, once DIGIT36 exists

---------------------------------------------------------------------------
-- Constants.
---------------------------------------------------------------------------
local MAX = 1000000000000000 -- largest |amount| raw (10^11 x 10^4)
local HUGE = 9007199254740992 -- 2^53: "more than any balance"
local SCALE = 1000000 -- cost scale (10^6)
local INF = 1 / 0
local MINUTE = 60000
local HOUR = 3600000
local DAY = 86400000
local NOMINAL_MONTH = 2678400000 -- 31 days
local MAX_INSTANT = 253402300799999
local MAX_BUCKETS = 64
local ROLLOVER_WINDOW = 66

-- Separators inside stored values (ids hold no control characters).
local US = '\31' -- between the fields of a bucket or of the customer record
local RS = '\30' -- between the buckets of a pool
local GS = '\29' -- between the rollover rows of a bucket
local RECORD_FIELD = '\31' -- the customer record's field; every field starting with \31 is reserved
local COMPLEX = '!'
local COMPLEX_BYTE = 33
local NONE = {} -- a shared empty list: never appended to (rows lists are replaced, not grown)
local LIMITS_FIELD = '\31L' -- the customer's limits and their counters (README § 11)
local LIMITS_NONE = LIMITS_FIELD .. '\30' -- an outcome reply's limits name: no denial, no shadow denial
local LIM = {} -- the limit rules (a table: a chunk holds at most 200 locals)
local LED = {} -- the ledger writer (§ 12)

-- The customer record: fields of RECORD_FIELD, \31-separated, trailing empty ones dropped.
local REC_CREATED_AT = 1
local REC_NEXT_SEQ = 2
local REC_BUCKET_DUE = 3 -- earliest next reset / bucket expiry / rollover expiry of any bucket
local REC_LOCK_DUE = 4 -- earliest expiry of a pending lock
-- field 5: 'L' when the customer holds limits (LIMITS_FIELD); no other
-- field holds an upper-case letter, so find(rec, 'L') tells.

-- A bucket: fields of its \31-separated string, trailing empty ones dropped.
local B_REMAINING = 1 -- first, so a new remaining is `e36(r) .. rest` without re-encoding;
-- prefixed with COMPLEX ('!') when the bucket has what the hot path must read
-- beyond remaining, id and granted: flag u or o, an overage floor, rollover rows.
local B_ID = 2
local B_GRANTED = 3
local B_INTERVAL = 4 -- interval code, '' = 0 (one_off)
local B_INTERVAL_COUNT = 5 -- '' = 1
local B_ANCHOR = 6 -- '' = 0
local B_NEXT_RESET_INDEX = 7 -- index of the next boundary, '' = none (one_off)
local B_EXPIRES_AT = 8
local B_FLAGS = 9 -- any of u (unlimited) o (overage_allowed) d (carry_debt)
local B_OVERAGE_FLOOR = 10
local B_ROLLOVER = 11 -- rollover setting "max/max_percentage/length" (length '' = forever)
local B_PLAN_ID = 12
local B_ROLLOVERS = 13 -- rows "expires_at,granted,balance" joined by \29, oldest first

-- Positional slots of the msgpack arrays (cold paths only, so tables: a
-- chunk may hold at most 200 locals).
-- A pending lock (a field of the lock hash); limit_held: { limit id, window
-- start, amount } per limit it holds room of (absent: none).
local LOCK = { feature = 1, units = 2, expires_at = 3, pools = 4, held = 5, limit_held = 6 }
-- A held entry of a lock; marker = the bucket's next_reset_at when held.
local HELD = { balance_id = 1, pool = 2, kind = 3, rollover_expires_at = 4, amount = 5, units = 6, marker = 7 }
-- A finalized lock's receipt (string key, PX).
local RECEIPT = { forget_at = 1, feature = 2, outcome = 3, pools = 4 }
-- A packed outcome (inside receipts), and its entries.
local PACKED = { allowed = 1, uncovered = 2, no_balance = 3, insufficient = 4, entries = 5, shadow = 6 }
local PENTRY = { balance_id = 1, pool = 2, kind = 3, rollover_expires_at = 4, amount = 5, units = 6 }

-- Idempotency records: the first IDEM_FP_BYTES bytes of a record hold the
-- first bytes of SHA1(fingerprint); the field is the first IDEM_KEY_BYTES
-- bytes of SHA1(idempotency key).
local IDEM_KEY_HEX = 24 -- 12 bytes = 96 bits
local IDEM_FP_HEX = 8 -- 4 bytes = 32 bits
local IDEM_FP_BYTES = 4

-- Outcome flags inside an idempotency record: one digit, the sum of these.
local OF_ALLOWED, OF_NO_BALANCE, OF_INSUFFICIENT = 1, 2, 4

---------------------------------------------------------------------------
-- Errors: typed failures become `-CG <code> [detail] @<now>` replies.
---------------------------------------------------------------------------
local NOW = nil -- the instant of the call in progress (reported in errors)

local function fail(code, detail)
  error({ cg = detail and (code .. ' ' .. detail) or code })
end

local function fmt(n)
  return format('%d', n)
end

local function run(main, keys, args)
  if not bound then
    bind()
    bind_pairs()
  end
  NOW = nil
  local ok, res = pcall(main, keys, args)
  if ok then
    return res
  end
  if type(res) == 'table' and res.cg then
    if NOW then
      return error_reply('CG ' .. res.cg .. ' @' .. fmt(NOW))
    end
    return error_reply('CG ' .. res.cg)
  end
  error(res)
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
  local out, n, i = {}, 0, 1
  while true do
    local j = find(s, sep, i, true)
    n = n + 1
    if not j then
      out[n] = sub(s, i)
      return out
    end
    out[n] = sub(s, i, j - 1)
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

-- The clock: ARGV `now` is `[<now ms>][@<deadline ms>]`. The instant: the
-- given ms, or Redis TIME when empty (production). The deadline, when given,
-- is on Redis's own clock (TIME, even when the instant is given): a call
-- that starts after it refuses itself, before any read or write, with
-- `store_unavailable deadline passed`: the client has given up on it by
-- then and answered that the outcome is unknown; a retry with the same
-- idempotency key then applies it once (lua/README.md § 9).
local function clock(s)
  local now, deadline
  if s ~= nil and s ~= '' then
    local at = find(s, '@', 1, true)
    if at then
      deadline = tonumber(sub(s, at + 1))
      s = sub(s, 1, at - 1)
      if deadline == nil then
        fail('invalid_inputs', 'argument deadline not a number')
      end
    end
    if s ~= '' then
      now = tonumber(s)
      if now == nil then
        fail('invalid_inputs', 'argument not a number')
      end
    end
  end
  if now == nil or deadline ~= nil then
    local t = rcall('TIME')
    local time = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
    if deadline ~= nil and time > deadline then
      NOW = now or time
      fail('store_unavailable', 'deadline passed')
    end
    now = now or time
  end
  NOW = now
  return now
end

---------------------------------------------------------------------------
-- Exact arithmetic (twin of the i128 products in src/money.rs).
-- Non-negative integers below 2^53 as little-endian limbs of base 10^7.
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
    local q = floor(p / c)
    return q, q * c == p
  end
  local q = floor(p / c)
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

-- money::cover: the units of `need` a source with `available` covers, and
-- its charge: max(min(need, affordable), 0). affordable >= need exactly when
-- charge(need) <= available (ceil(u*c) <= a <=> u*c <= a for integer a), so
-- the common case (the source covers it all) needs one small product, never
-- available * 10^6, which passes 2^53 for balances above 9*10^9 raw.
local function cover(need, available, cost)
  if need <= 0 then
    return 0, 0
  end
  local c = charge(need, cost)
  if c <= available then
    return need, c
  end
  local units = affordable(available, cost)
  return units, charge(units, cost)
end

---------------------------------------------------------------------------
-- Calendar (twin of src/calendar.rs). Every division has a positive
-- divisor, so floor(a / b) is Rust's div_euclid.
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
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_ms(t)
  local days = floor(t / DAY)
  local tod = t - days * DAY
  local z = days + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local d = doy - floor((153 * mp + 2) / 5) + 1
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
  local ny = floor(total / 12)
  local nm = total - ny * 12 + 1
  local nd = min(d, days_in_month(ny, nm))
  return days_from_civil(ny, nm, nd) * DAY + tod
end

-- Interval codes as stored: 0 one_off, 1 minute, 2 hour, 3 day, 4 week,
-- 5 month, 6 quarter, 7 semi_annual, 8 year, 9 second (limits only).
local STEP_MS = { [1] = MINUTE, [2] = HOUR, [3] = DAY, [4] = 7 * DAY, [9] = 1000 }
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
    i = floor((t - anchor) / p.ms)
  else
    local ya, ma = civil_from_ms(anchor)
    local yt, mt = civil_from_ms(t)
    i = floor(((yt - ya) * 12 + (mt - ma)) / p.months)
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
-- Base 36 (digits 0-9a-z, '-' for negatives): every stored integer.
---------------------------------------------------------------------------
local DIGIT36 = {
  [0] = '0', '1', '2', '3', '4', '5', '6', '7', '8', '9',
  'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm',
  'n', 'o', 'p', 'q', 'r', 's', 't', 'u', 'v', 'w', 'x', 'y', 'z',
}

local PAIR36 -- 0..1295 -> two base-36 digits (built on the first call)
bind_pairs = function()
  PAIR36 = {}
  for i = 0, 1295 do
    PAIR36[i] = DIGIT36[floor(i / 36)] .. DIGIT36[i % 36]
  end
end

local function e36(n)
  if n < 36 then
    if n >= 0 then
      return DIGIT36[n]
    end
    return '-' .. e36(-n)
  end
  local s = ''
  while n >= 1296 do
    local r = n % 1296
    s = PAIR36[r] .. s
    n = (n - r) / 1296
  end
  if n >= 36 then
    return PAIR36[n] .. s
  end
  return DIGIT36[n] .. s
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
  if byte(s, 1) == 45 then -- '-'
    return -tonumber(sub(s, 2), 36)
  end
  return tonumber(s, 36)
end

---------------------------------------------------------------------------
-- Buckets. Lua field names are the Rust names; the stored form is
-- documented at the B_* constants and in lua/README-cg2.md.
---------------------------------------------------------------------------
-- next_reset_at = min(boundary(anchor, next_reset_index), MAX_INSTANT + 1),
-- memoized per index (a calendar boundary costs a civil-date round trip).
local function next_reset_at(b)
  local i = b.next_reset_index
  if i == nil then
    return nil
  end
  if b.nra_index ~= i then
    b.nra_index, b.nra = i, min(boundary(b.period, b.anchor, i), MAX_INSTANT + 1)
  end
  return b.nra
end

local function decode_rollovers(s)
  if s == nil or s == '' then
    return NONE
  end
  local rows = {}
  for i, r in ipairs(split(s, GS)) do
    local f = split(r, ',')
    rows[i] = { expires_at = d36(f[1]), granted = d36(f[2]), balance = d36(f[3]) }
  end
  return rows
end

local function encode_rollovers(rows)
  local parts = {}
  for i, r in ipairs(rows) do
    parts[i] = o36(r.expires_at) .. ',' .. e36(r.granted) .. ',' .. e36(r.balance)
  end
  return concat(parts, GS)
end

-- Every field of a bucket string, as one table built by one constructor:
-- Lua sizes a constructor's table once, where adding twenty fields one by
-- one rehashes it four times (the profile of a due reset: decoding two
-- buckets cost more than the HGETALL that read them).
local function decode_full(pool, s)
  local f = split(s, US)
  local head, r = '', f[B_REMAINING]
  if byte(s, 1) == COMPLEX_BYTE then
    head = COMPLEX
    r = sub(r, 2)
  end
  local code = d36(f[B_INTERVAL]) or 0
  local count = d36(f[B_INTERVAL_COUNT]) or 1
  local flags = f[B_FLAGS] or ''
  local plan = f[B_PLAN_ID]
  local ro = f[B_ROLLOVER]
  local rollover = nil
  if ro ~= nil and ro ~= '' then
    local x = split(ro, '/')
    rollover = { max = d36(x[1]), max_percentage = d36(x[2]), length = d36(x[3]) }
  end
  local rem = d36(r)
  return {
    pool = pool,
    src = s,
    rewrite = false,
    id = f[B_ID],
    remaining = rem,
    stored_remaining = rem,
    granted = d36(f[B_GRANTED]),
    interval = code,
    interval_count = count,
    period = make_period(code, count),
    anchor = d36(f[B_ANCHOR]) or 0,
    next_reset_index = d36(f[B_NEXT_RESET_INDEX]),
    expires_at = d36(f[B_EXPIRES_AT]),
    unlimited = find(flags, 'u', 1, true) ~= nil,
    overage_allowed = find(flags, 'o', 1, true) ~= nil,
    carry_debt = find(flags, 'd', 1, true) ~= nil,
    overage_floor = d36(f[B_OVERAGE_FLOOR]),
    plan_id = (plan ~= nil and plan ~= '') and plan or nil,
    rollovers = decode_rollovers(f[B_ROLLOVERS]),
    rollover = rollover,
    head = head,
    tail_at = #head + #r + 1,
    decoded = true,
    -- next_reset_at's memo, set later: a slot now, not a rehash then.
    nra_index = false,
    nra = false,
    snap_remaining = false,
  }
end

-- A bucket without the COMPLEX marker is read lazily on the hot path:
-- remaining, id and granted now, the rest (calendar fields, carry_debt,
-- plan id, rollover setting) on first use (LAZY.__index).
local PLAIN = '^([^\31]*)\31([^\31]*)\31([^\31]*)'
local LAZY = {
  __index = function(b, k)
    if rawget(b, 'decoded') then
      return nil
    end
    -- Only the cold fields: the hot ones may have changed since.
    local f = split(rawget(b, 'src'), US)
    local code = d36(f[B_INTERVAL]) or 0
    local count = d36(f[B_INTERVAL_COUNT]) or 1
    local plan = f[B_PLAN_ID]
    b.interval = code
    b.interval_count = count
    b.period = make_period(code, count)
    b.anchor = d36(f[B_ANCHOR]) or 0
    b.next_reset_index = d36(f[B_NEXT_RESET_INDEX])
    b.expires_at = d36(f[B_EXPIRES_AT])
    b.carry_debt = find(f[B_FLAGS] or '', 'd', 1, true) ~= nil
    b.plan_id = (plan ~= nil and plan ~= '') and plan or nil
    local ro = f[B_ROLLOVER]
    if ro ~= nil and ro ~= '' then
      local r = split(ro, '/')
      b.rollover = { max = d36(r[1]), max_percentage = d36(r[2]), length = d36(r[3]) }
    end
    b.decoded = true
    return rawget(b, k)
  end,
}

local function decode_bucket(pool, s, lazy)
  if lazy and byte(s, 1) ~= COMPLEX_BYTE then
    local r, id, g = match(s, PLAIN)
    local rem = d36(r)
    return setmetatable({
      id = id,
      pool = pool,
      remaining = rem,
      granted = d36(g),
      unlimited = false,
      overage_allowed = false,
      rollovers = NONE,
      src = s,
      head = '',
      tail_at = #r + 1,
      stored_remaining = rem,
      rewrite = false,
      decoded = false,
    }, LAZY)
  end
  return decode_full(pool, s)
end

local function encode_bucket(b)
  if not b.rewrite and b.src then
    if b.remaining == b.stored_remaining then
      return b.src
    end
    return b.head .. e36(b.remaining) .. sub(b.src, b.tail_at)
  end
  local flags = (b.unlimited and 'u' or '') .. (b.overage_allowed and 'o' or '') .. (b.carry_debt and 'd' or '')
  local ro = ''
  if b.rollover then
    ro = o36(b.rollover.max) .. '/' .. o36(b.rollover.max_percentage) .. '/' .. o36(b.rollover.length)
  end
  local complex = b.unlimited or b.overage_allowed or b.overage_floor ~= nil or b.rollovers[1] ~= nil
  local f = {
    (complex and COMPLEX or '') .. e36(b.remaining),
    b.id,
    e36(b.granted),
    b.interval == 0 and '' or e36(b.interval),
    b.interval_count == 1 and '' or e36(b.interval_count),
    (b.period and b.anchor ~= 0) and e36(b.anchor) or '',
    o36(b.next_reset_index),
    o36(b.expires_at),
    flags,
    o36(b.overage_floor),
    ro,
    b.plan_id or '',
    encode_rollovers(b.rollovers),
  }
  local n = #f
  while n > 1 and f[n] == '' do
    f[n] = nil
    n = n - 1
  end
  return concat(f, US)
end

local function decode_pool(name, s, lazy)
  local P = { name = name, src = s, buckets = {}, n0 = 0 }
  if s == nil then
    return P
  end
  local i, n = 1, 0
  while true do
    local j = find(s, RS, i, true)
    n = n + 1
    if not j then
      P.buckets[n] = decode_bucket(name, i == 1 and s or sub(s, i), lazy)
      P.n0 = n
      return P
    end
    P.buckets[n] = decode_bucket(name, sub(s, i, j - 1), lazy)
    i = j + 1
  end
end

local function encode_pool(P)
  local bs = P.buckets
  if #bs == 1 then
    return encode_bucket(bs[1])
  end
  local parts = {}
  for i, b in ipairs(bs) do
    parts[i] = encode_bucket(b)
  end
  return concat(parts, RS)
end

-- rules::bucket_order_key without the pool index and seq: a pool's field
-- keeps its buckets in this order, ties in creation order.
local function order_less_or_equal(a, b)
  local an, bn_ = a.period == nil and 1 or 0, b.period == nil and 1 or 0
  if an ~= bn_ then
    return an < bn_
  end
  local ap, bp = a.period and nominal_ms(a.period) or 0, b.period and nominal_ms(b.period) or 0
  if ap ~= bp then
    return ap < bp
  end
  return (a.expires_at or INF) <= (b.expires_at or INF)
end

-- Inserts a new bucket (the newest: after every bucket of equal key).
local function insert_ordered(P, b)
  local at = #P.buckets + 1
  for i = #P.buckets, 1, -1 do
    if order_less_or_equal(P.buckets[i], b) then
      break
    end
    at = i
  end
  for i = #P.buckets, at, -1 do
    P.buckets[i + 1] = P.buckets[i]
  end
  P.buckets[at] = b
end

-- rules.rs works on a copy and commits by assignment; here the same
-- all-or-nothing is an undo record of each bucket's remaining and its rows'
-- balances, kept in the bucket and row tables themselves (no allocation).
local function snapshot(list)
  for _, b in ipairs(list) do
    b.snap_remaining = b.remaining
    for _, r in ipairs(b.rollovers) do
      r.snap_balance = r.balance
    end
  end
end

local function restore(list)
  for _, b in ipairs(list) do
    b.remaining = b.snap_remaining
    for _, r in ipairs(b.rollovers) do
      r.balance = r.snap_balance
    end
  end
end

---------------------------------------------------------------------------
-- The customer: its record, the pools read so far, pending locks, and the
-- writes collected until the end (nothing is written before the operation
-- has succeeded, so an error leaves every key as it was).
---------------------------------------------------------------------------
local function bucket_due(b)
  local s = opt_min(next_reset_at(b), b.expires_at)
  for _, r in ipairs(b.rollovers) do
    s = opt_min(s, r.expires_at)
  end
  return s
end

local function parse_record(C, rec)
  local r = split(rec, US)
  C.rec = rec
  C.created_at = d36(r[REC_CREATED_AT])
  C.next_seq = d36(r[REC_NEXT_SEQ])
  C.bucket_due = d36(r[REC_BUCKET_DUE])
  C.lock_due = d36(r[REC_LOCK_DUE])
  C.lock_due0 = C.lock_due
  C.due0 = opt_min(C.bucket_due, C.lock_due)
  C.has_limits = find(rec, 'L', 1, true) ~= nil
end

-- The hot path reads only the two due instants; the record is rewritten
-- when the customer was fully loaded (next_seq, bucket_due may change) or
-- the lock due instant changed.
local REC_DUES = '^[^\31]*\31[^\31]*\31?([^\31]*)\31?([^\31]*)'
local function parse_record_dues(C, rec)
  local bd, ld = match(rec, REC_DUES)
  C.rec = rec
  C.bucket_due = d36(bd)
  C.lock_due = d36(ld)
  C.lock_due0 = C.lock_due
  C.due0 = opt_min(C.bucket_due, C.lock_due)
  C.has_limits = find(rec, 'L', 1, true) ~= nil
end

local function encode_record(C)
  local f = e36(C.created_at) .. US .. e36(C.next_seq)
  if C.has_limits then
    return f .. US .. o36(C.bucket_due) .. US .. o36(C.lock_due) .. US .. 'L'
  elseif C.lock_due then
    return f .. US .. o36(C.bucket_due) .. US .. e36(C.lock_due)
  elseif C.bucket_due then
    return f .. US .. e36(C.bucket_due)
  end
  return f
end

-- The customer's hash tag (its escaped id) from its key `<ns>cg2:{<tag>}`:
-- the due index's member and the idempotency digest's customer part.
local function tag_of(key)
  return match(key, '{([^}]*)}')
end

-- ARGV[2] retention: '' = 24 h for both, '<ms>' both, '<idempotency ms>,<finalized lock ms>',
-- and with the ledger on '<idempotency ms>,<finalized lock ms>,<ledger cap>' (§ 12).
local DEFAULT_RETENTION = 86400000
local function retention(s)
  if s == nil or s == '' then
    return DEFAULT_RETENTION, DEFAULT_RETENTION, nil
  end
  local i = find(s, ',', 1, true)
  local a, b, cap
  if i then
    local j = find(s, ',', i + 1, true)
    if j then
      a, b, cap = tonumber(sub(s, 1, i - 1)), tonumber(sub(s, i + 1, j - 1)), tonumber(sub(s, j + 1))
      if cap == nil or cap < 1 then
        fail('invalid_inputs', 'argument retention ledger cap not a positive number')
      end
    else
      a, b = tonumber(sub(s, 1, i - 1)), tonumber(sub(s, i + 1))
    end
  else
    a = tonumber(s)
    b = a
  end
  if a == nil or b == nil then
    fail('invalid_inputs', 'argument retention not a number')
  end
  return a, b, cap
end

local function new_customer(keys, args, now)
  now = now or clock(args[1])
  local ri, rl, cap = retention(args[2])
  return {
    led = cap and {} or nil, -- the ledger's queued entries (§ 12), nil: off
    led_cap = cap,
    key = keys[1],
    lock_key = keys[1] .. ':l',
    due_key = keys[2],
    now = now,
    ret_idem = ri,
    ret_lock = rl,
    member = tag_of(keys[1]),
    full = false,
    pools = {}, -- name -> { name, src, buckets }
    pool_list = {}, -- names in the order read
    lk = nil, -- lock state, created on first use (lock_state)
  }
end

-- Pending locks read (lock id -> lock, false once removed), locks to write,
-- receipts to write (lock id -> receipt) and receipts to delete.
local function lock_state(C)
  local lk = C.lk
  if not lk then
    lk = { locks = {}, dirty = {}, receipts = {}, receipt_del = {} }
    C.lk = lk
  end
  return lk
end

local function add_pool(C, name, s, lazy)
  if C.pools[name] then
    return
  end
  C.pools[name] = decode_pool(name, s, lazy)
  C.pool_list[#C.pool_list + 1] = name
end

local function find_bucket(C, id)
  for _, name in ipairs(C.pool_list) do
    for i, b in ipairs(C.pools[name].buckets) do
      if b.id == id then
        return b, C.pools[name], i
      end
    end
  end
  return nil
end

local function count_buckets(C)
  local n = 0
  for _, name in ipairs(C.pool_list) do
    n = n + #C.pools[name].buckets
  end
  return n
end

local function load_all(C)
  local raw = rcall('HGETALL', C.key)
  local rec
  C.pools, C.pool_list = {}, {}
  for i = 1, #raw, 2 do
    local f = raw[i]
    if f == RECORD_FIELD then
      rec = raw[i + 1]
    elseif f == LIMITS_FIELD then
      C.limits_raw = raw[i + 1]
    elseif sub(f, 1, 1) ~= US then
      add_pool(C, f, raw[i + 1])
    end
  end
  if rec == nil then
    fail('customer_not_found')
  end
  parse_record(C, rec)
  C.full = true
end

-- Locks: a pending lock is one field of the lock hash (L_* slots).
local function get_lock(C, id)
  local l = lock_state(C).locks[id]
  if l ~= nil then
    return l or nil
  end
  local v = rcall('HGET', C.lock_key, id)
  if not v then
    lock_state(C).locks[id] = false
    return nil
  end
  l = mp_unpack(v)
  lock_state(C).locks[id] = l
  return l
end

local function set_lock(C, id, l)
  lock_state(C).locks[id] = l or false
  lock_state(C).dirty[id] = true
end

local function receipt_key(C, id)
  return C.key .. ':f:' .. id
end

local function get_receipt(C, id)
  local r = lock_state(C).receipts[id]
  if r == nil and not lock_state(C).receipt_del[id] then
    local v = rcall('GET', receipt_key(C, id))
    if v then
      r = mp_unpack(v)
    end
  end
  if r and r[RECEIPT.forget_at] > C.now then
    return r
  end
  return nil
end

-- The earliest expiry of the pending locks left (after a finalize removed one).
local function recompute_lock_due(C)
  local raw = rcall('HGETALL', C.lock_key)
  local le = nil
  for i = 1, #raw, 2 do
    local id = raw[i]
    local l = lock_state(C).locks[id]
    if l == nil then
      l = mp_unpack(raw[i + 1])
    end
    if l and l[LOCK.expires_at] then
      le = opt_min(le, l[LOCK.expires_at])
    end
  end
  for id, l in pairs(lock_state(C).locks) do
    if l and l[LOCK.expires_at] and lock_state(C).dirty[id] then
      le = opt_min(le, l[LOCK.expires_at])
    end
  end
  C.lock_due = le
end

-- Writes back what changed. `shown`: the pools ({ pool = name }...) whose
-- strings the reply carries; returns them (after the operation) in a flat
-- { name, string, ... } list.
local function save(C, shown)
  if C.led and C.led_s1 and C.led_meta then
    LED.queue(C, C.led_s1, C.led_meta)
  end
  if C.led and C.led[1] then
    LED.guard(C.due_key, C.led_cap, #C.led) -- before the first write
  end
  local hset, hdel = nil, nil
  local bd = nil
  for _, name in ipairs(C.pool_list) do
    local P = C.pools[name]
    local bs = P.buckets
    local s = ''
    if bs[1] then
      local changed = P.src == nil or #bs ~= P.n0
      if not changed then
        for _, b in ipairs(bs) do
          if b.rewrite or b.remaining ~= b.stored_remaining then
            changed = true
            break
          end
        end
      end
      s = changed and encode_pool(P) or P.src
    end
    P.out = s
    if s == '' then
      if P.src then
        hdel = hdel or {}
        hdel[#hdel + 1] = name
      end
    elseif s ~= P.src then
      hset = hset or {}
      hset[#hset + 1] = name
      hset[#hset + 1] = s
    end
    if C.full then
      for _, b in ipairs(P.buckets) do
        bd = opt_min(bd, bucket_due(b))
      end
    end
  end
  if C.full then
    C.bucket_due = bd
  end
  if C.limits then
    local ls = LIM.encode(C.limits)
    C.limits_out = ls
    if ls ~= C.limits_src then
      hset = hset or {}
      hset[#hset + 1] = LIMITS_FIELD
      hset[#hset + 1] = ls
    end
  end
  if C.full or C.lock_due ~= C.lock_due0 then
    if C.created_at == nil then
      local keep = { C.bucket_due, C.lock_due }
      parse_record(C, C.rec)
      C.bucket_due, C.lock_due = keep[1], keep[2]
    end
    local rec = encode_record(C)
    if rec ~= C.rec then
      hset = hset or {}
      hset[#hset + 1] = RECORD_FIELD
      hset[#hset + 1] = rec
    end
  end
  if hset then
    if hset[3] == nil then
      rcall('HSET', C.key, hset[1], hset[2])
    else
      rcall('HSET', C.key, unpack(hset))
    end
  end
  if hdel then
    rcall('HDEL', C.key, unpack(hdel))
  end
  local lk = C.lk
  if lk then
    for id, _ in pairs(lk.dirty) do
      local l = lk.locks[id]
      if l then
        rcall('HSET', C.lock_key, id, mp_pack(l))
      else
        rcall('HDEL', C.lock_key, id)
      end
    end
    for id, _ in pairs(lk.receipt_del) do
      if not lk.receipts[id] then
        rcall('DEL', receipt_key(C, id))
      end
    end
    for id, r in pairs(lk.receipts) do
      rcall('SET', receipt_key(C, id), mp_pack(r), 'PX', max(1, C.ret_lock))
    end
  end
  local due = opt_min(C.bucket_due, C.lock_due)
  if due ~= C.due0 then
    if due == nil then
      rcall('ZREM', C.due_key, C.member)
    else
      rcall('ZADD', C.due_key, due, C.member)
    end
  end
  local out = {}
  if shown then
    for i, p in ipairs(shown) do
      local P = C.pools[p.pool]
      out[2 * i - 1] = p.pool
      out[2 * i] = P and P.out or ''
    end
  end
  LED.flush(C)
  return out
end

---------------------------------------------------------------------------
-- Deduction order (rules::deduction_order). A pool's field already holds
-- its buckets in bucket_order_key order, so the members are the owned
-- pools' lists one after the other: no sort unless there are rollovers.
---------------------------------------------------------------------------
local function deduction_order(C, owned)
  local order = { unlimited = NONE, rollovers = NONE, buckets = {} }
  local rolls = nil
  local rank = 0
  for _, p in ipairs(owned) do
    for _, b in ipairs(C.pools[p.pool].buckets) do
      rank = rank + 1
      -- A bucket is its own source (b.b = b): no wrapper table per request.
      b.b, b.kind, b.cost = b, 'b', p.cost
      if b.unlimited then
        if order.unlimited == NONE then
          order.unlimited = {}
        end
        order.unlimited[#order.unlimited + 1] = b
      else
        order.buckets[#order.buckets + 1] = b
        for ri, row in ipairs(b.rollovers) do
          rolls = rolls or {}
          rolls[#rolls + 1] = {
            key1 = row.expires_at or INF,
            rank = rank,
            ri = ri,
            src = { b = b, kind = 'r', rollover_expires_at = row.expires_at, cost = p.cost },
          }
        end
      end
    end
  end
  if rolls then
    sort(rolls, function(x, y)
      if x.key1 ~= y.key1 then
        return x.key1 < y.key1
      end
      if x.rank ~= y.rank then
        return x.rank < y.rank
      end
      return x.ri < y.ri
    end)
    order.rollovers = {}
    for i, r in ipairs(rolls) do
      order.rollovers[i] = r.src
    end
  end
  return order
end

local function row_of(b, expires_at)
  for _, r in ipairs(b.rollovers) do
    if r.expires_at == expires_at then
      return r
    end
  end
  return nil
end

-- rules::record: adds to an entry list, merging entries of one source.
-- An entry: { balance_id, pool, kind 'b'|'r', rollover_expires_at (nil = never), amount, units }.
local function record(entries, src, amount, units)
  if amount == 0 and units == 0 then
    return
  end
  local b, kind = src.b, src.kind
  local rexp = nil
  if kind == 'r' then
    rexp = src.rollover_expires_at
  end
  for _, e in ipairs(entries) do
    if e.balance_id == b.id and e.kind == kind and e.rollover_expires_at == rexp then
      e.amount = e.amount + amount
      e.units = e.units + units
      return
    end
  end
  entries[#entries + 1] = {
    balance_id = b.id,
    pool = b.pool,
    kind = kind,
    rollover_expires_at = rexp,
    amount = amount,
    units = units,
  }
end

local function bucket_floor(b)
  if not b.overage_allowed then
    return 0
  end
  return b.overage_floor or -MAX
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
  for pass = 1, 2 do
    local list = pass == 1 and order.rollovers or order.buckets
    for _, s in ipairs(list) do
      if need == 0 then
        break
      end
      local available
      local row
      if s.kind == 'b' then
        available = max(s.b.remaining, 0)
      else
        row = row_of(s.b, s.rollover_expires_at)
        available = row and row.balance or 0
      end
      local took, paid = cover(need, available, s.cost)
      if took > 0 then
        if s.kind == 'b' then
          s.b.remaining = s.b.remaining - paid
        elseif row then
          row.balance = row.balance - paid
          s.b.rewrite = true
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
    if s.b.overage_allowed then
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
  for pass = 1, 2 do
    local heal = pass == 1
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

-- Sum of max(0, r(j)) for j < k, clamped to MAX by the caller.
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
  local jp = floor(-r0 / g) + 1
  if jp > k - 1 then
    return 0
  end
  return remaining_after(r0, g, true, jp) + ((k - 1) - jp) * g
end

-- RolloverConfig::cap: max, or floor(granted * pct / 10^6) (pct raw at 4 digits, /100)
local function rollover_cap(b)
  if b.rollover.max then
    return b.rollover.max
  end
  if b.rollover.max_percentage then
    return (muldiv(b.granted, b.rollover.max_percentage, 1000000))
  end
  return nil
end

-- rules::fill: newest-first rows -> kept rows (oldest first), capped.
local function fill(newest_first, cap)
  local merged = {}
  for _, row in ipairs(newest_first) do
    local last = merged[#merged]
    if last and last.expires_at == row.expires_at then
      last.granted = min(last.granted + row.granted, MAX)
      last.balance = min(last.balance + row.balance, MAX)
    else
      merged[#merged + 1] = { expires_at = row.expires_at, granted = row.granted, balance = row.balance }
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

-- rules::reset_bucket: every boundary at or before now at once (closed form).
local function reset_bucket(b, now)
  local nxt = next_reset_at(b)
  if b.period == nil or nxt == nil or nxt > now then
    return false
  end
  local p = b.period
  -- The Rust computes first = last_index_at_or_before(anchor, next_reset_at);
  -- next_reset_at is boundary(anchor, index) and not clamped here, so first = index.
  local first = b.next_reset_index
  local last = last_index_at_or_before(p, b.anchor, now)
  local k = last - first + 1
  local r0, g = b.remaining, b.granted
  local carry = b.carry_debt and not b.unlimited
  if b.rollover then
    local cap = min(rollover_cap(b) or MAX, MAX)
    local rows = {}
    if b.rollover.length then
      for j = k, max(1, k - ROLLOVER_WINDOW + 1), -1 do
        local bnd = boundary(p, b.anchor, first + j - 1)
        local expires_at = add_months(bnd, b.rollover.length)
        local amount = max(remaining_after(r0, g, carry, j - 1), 0)
        if expires_at > now and amount > 0 then
          rows[#rows + 1] = { expires_at = expires_at, granted = amount, balance = amount }
        end
      end
      for i = #b.rollovers, 1, -1 do
        local r = b.rollovers[i]
        if r.expires_at == nil or r.expires_at > now then
          rows[#rows + 1] = { expires_at = r.expires_at, granted = r.granted, balance = r.balance }
        end
      end
    else
      local added = min(rolled_total(r0, g, carry, k), MAX)
      local og, ob = 0, 0
      for _, r in ipairs(b.rollovers) do
        if r.expires_at == nil then
          og, ob = r.granted, r.balance
          break
        end
      end
      rows[1] = { expires_at = nil, granted = min(og + added, MAX), balance = min(ob + added, MAX) }
    end
    b.rollovers = fill(rows, cap)
  end
  b.remaining = max(min(remaining_after(r0, g, carry, k), MAX), -MAX)
  b.next_reset_index = last + 1
  b.rewrite = true
  return true
end

---------------------------------------------------------------------------
-- Outcomes, lock release (rules::release_held) and prepare.
---------------------------------------------------------------------------
local function outcome(allowed, entries, uncovered)
  return { allowed = allowed, entries = entries, uncovered = uncovered, no_balance = false, insufficient = false }
end

local function release_held(C, lock, at)
  local entries = {}
  local lost = 0
  for _, h in ipairs(lock[LOCK.held]) do
    local bid, kind = h[HELD.balance_id], h[HELD.kind]
    local exp, amount, units, marker = h[HELD.rollover_expires_at] or nil, h[HELD.amount], h[HELD.units], h[HELD.marker] or nil
    local b = find_bucket(C, bid)
    local target = nil
    if b and (b.expires_at == nil or b.expires_at > at) then
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
        target.rewrite = true
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
      entries[#entries + 1] = { balance_id = bid, pool = h[HELD.pool], kind = kind, rollover_expires_at = exp, amount = -back, units = -u }
    end
  end
  return outcome(true, entries, lost)
end

local function pack_outcome(o)
  local es = {}
  for i, e in ipairs(o.entries) do
    es[i] = { e.balance_id, e.pool, e.kind, e.rollover_expires_at or false, e.amount, e.units }
  end
  local p = { o.allowed and 1 or 0, o.uncovered, o.no_balance and 1 or 0, o.insufficient and 1 or 0, es }
  if o.shadow and o.shadow[1] then
    p[PACKED.shadow] = o.shadow
  end
  return p
end

local function unpack_outcome(p)
  local es = {}
  for i, e in ipairs(p[PACKED.entries]) do
    es[i] = {
      balance_id = e[PENTRY.balance_id],
      pool = e[PENTRY.pool],
      kind = e[PENTRY.kind],
      rollover_expires_at = e[PENTRY.rollover_expires_at] or nil,
      amount = e[PENTRY.amount],
      units = e[PENTRY.units],
    }
  end
  return {
    allowed = p[PACKED.allowed] == 1,
    uncovered = p[PACKED.uncovered],
    no_balance = p[PACKED.no_balance] == 1,
    insufficient = p[PACKED.insufficient] == 1,
    entries = es,
    shadow = p[PACKED.shadow],
  }
end

-- rules::prepare, on a fully loaded customer: expired pending locks are
-- released (each as of its own expiry, in expiry order), expired buckets
-- dropped, due resets applied, expired rollovers dropped. Returns the number
-- of buckets that reset.
local function prepare(C)
  local now = C.now
  if C.lock_due and C.lock_due <= now then
    local raw = rcall('HGETALL', C.lock_key)
    local expired, le = {}, nil
    for i = 1, #raw, 2 do
      local id = raw[i]
      local l = mp_unpack(raw[i + 1])
      lock_state(C).locks[id] = l
      local e = l[LOCK.expires_at] or nil
      if e and e <= now then
        expired[#expired + 1] = { e = e, id = id }
      elseif e then
        le = opt_min(le, e)
      end
    end
    sort(expired, function(a, b)
      if a.e ~= b.e then
        return a.e < b.e
      end
      return a.id < b.id
    end)
    for _, x in ipairs(expired) do
      local lock = lock_state(C).locks[x.id]
      local s0 = C.led and LED.snap(C)
      local o = release_held(C, lock, x.e)
      LIM.release_expired(C, lock[LOCK.limit_held])
      if s0 then
        LED.queue(C, s0, { op = 'lock_expired', feature = lock[LOCK.feature], lock_id = x.id })
      end
      lock_state(C).receipts[x.id] = { x.e + C.ret_lock, lock[LOCK.feature], pack_outcome(o), lock[LOCK.pools] }
      set_lock(C, x.id, nil)
    end
    C.lock_due = le
  end
  local resets = 0
  -- The ledger's items: what expired (buckets, rollover rows), what reset.
  local led = C.led
  local gone, reset = led and {}, led and {}
  for _, name in ipairs(C.pool_list) do
    local P = C.pools[name]
    local live = {}
    for _, b in ipairs(P.buckets) do
      if b.expires_at == nil or b.expires_at > now then
        live[#live + 1] = b
      elseif led then
        local t = LED.total(b)
        if t ~= 0 then
          gone[#gone + 1] = LED.item(b.id, name, b.plan_id, -t)
        end
      end
    end
    P.buckets = live
    for _, b in ipairs(live) do
      local t0 = led and LED.total(b)
      local did = reset_bucket(b, now)
      if did then
        resets = resets + 1
      end
      local rows, dropped = {}, false
      for _, r in ipairs(b.rollovers) do
        if r.expires_at == nil or r.expires_at > now then
          rows[#rows + 1] = r
        else
          dropped = true
        end
      end
      if dropped then
        b.rollovers = rows
        b.rewrite = true
      end
      if led then
        local d = LED.total(b) - t0
        if d ~= 0 then
          local list = did and reset or gone
          list[#list + 1] = LED.item(b.id, name, b.plan_id, d)
        end
      end
    end
  end
  if led then
    if gone[1] then
      led[#led + 1] = LED.encode(now, C.key, 'expire', nil, 0, gone, NONE)
    end
    if reset[1] then
      led[#led + 1] = LED.encode(now, C.key, 'reset', nil, 0, reset, NONE)
    end
  end
  return resets
end

-- Opens an existing customer. With `pools` (a request's pools) and nothing
-- of the customer due, reads only the record and those pools' fields;
-- otherwise (or with pools == nil) reads everything and runs prepare.
-- HMGET of the record and the fields of `pools`.
local function read_fields(key, pools)
  local n = #pools
  if n == 1 then
    return rcall('HMGET', key, RECORD_FIELD, pools[1].pool)
  elseif n == 2 then
    return rcall('HMGET', key, RECORD_FIELD, pools[1].pool, pools[2].pool)
  end
  local fields = { RECORD_FIELD }
  for i, p in ipairs(pools) do
    fields[i + 1] = p.pool
  end
  return rcall('HMGET', key, unpack(fields))
end

-- `now` and `v` (read_fields' reply) when the caller already has them.
local function open(keys, args, pools, now, v)
  local C = new_customer(keys, args, now)
  if pools then
    v = v or read_fields(C.key, pools)
    local rec = v[1]
    if not rec then
      fail('customer_not_found')
    end
    parse_record_dues(C, rec)
    -- The hot path's HMGET carries the limits' field after the pools'.
    if C.has_limits and v[#pools + 2] ~= nil then
      C.limits_raw = v[#pools + 2] or ''
    end
    if C.due0 == nil or C.due0 > C.now then
      for i, p in ipairs(pools) do
        local s = v[i + 1]
        if s then
          add_pool(C, p.pool, s, true)
        end
      end
      if C.led then
        C.led_s1 = LED.snap(C)
      end
      return C, 0
    end
  end
  load_all(C)
  local resets = prepare(C)
  if C.led then
    C.led_s1 = LED.snap(C)
  end
  return C, resets
end

---------------------------------------------------------------------------
-- Requests (rules::check, track, apply).
---------------------------------------------------------------------------
-- The catalog travels in args: from position `at` to the end, pool, cost
-- pairs in deduction order (the feature's own pool first, cost 1000000).
-- None: an unknown feature (nil here, feature_not_found where the Rust
-- raises it).
local function read_pools(args, at)
  local n = floor((#args - at + 1) / 2)
  if n < 1 then
    return nil
  end
  local pools = {}
  for i = 1, n do
    local cost = tonumber(args[at + 2 * i - 1])
    if cost == nil then
      fail('invalid_inputs', 'argument cost not a number')
    end
    pools[i] = { pool = args[at + 2 * i - 2], cost = cost }
  end
  return pools
end

-- rules::owned_pools: FeatureNotFound surfaces here, where the Rust raises it.
local function owned_pools(C, pools)
  if pools == nil then
    fail('feature_not_found')
  end
  local owned, n = {}, 0
  for _, p in ipairs(pools) do
    local P = C.pools[p.pool]
    if P and P.buckets[1] then
      local dup = false
      for i = 1, n do
        if owned[i].pool == p.pool then
          dup = true
        end
      end
      if not dup then
        n = n + 1
        owned[n] = p
      end
    end
  end
  return owned
end

local function no_balance(units, insufficient)
  local o = outcome(false, {}, units < 0 and -units or units)
  o.no_balance = true
  o.insufficient = insufficient
  return o
end

-- rules::check on a copy; with keep, the deduction stays (consume, reserve).
local function check_rule(C, pools, units, keep)
  local owned = owned_pools(C, pools)
  if #owned == 0 then
    return no_balance(units, false)
  end
  local order = deduction_order(C, owned)
  snapshot(order.buckets)
  snapshot(order.unlimited)
  local entries, rest = deduct(order, units)
  if rest > 0 then
    restore(order.buckets)
    restore(order.unlimited)
    return outcome(false, {}, rest)
  end
  -- rules::judge: every limit on the feature and its paying pools.
  local J = C.lim and LIM.judge(C, entries)
  if J and J.blocked then
    restore(order.buckets)
    restore(order.unlimited)
    local o = outcome(false, {}, units)
    o.limit, o.shadow = J.blocked, J.shadow
    return o
  end
  if not keep then
    restore(order.buckets)
    restore(order.unlimited)
  end
  local o = outcome(true, entries, 0)
  if J then
    o.shadow = J.shadow
    if keep then
      o.holds = LIM.take_all(C, J.takes)
    end
  end
  return o
end

-- rules::track (a negative `units` refunds).
local function track_rule(C, pools, units, behavior)
  if C.lim then
    return LIM.track_rule(C, pools, units, behavior)
  end
  local owned = owned_pools(C, pools)
  if #owned == 0 then
    return no_balance(units, behavior == 'reject' and units > 0)
  end
  local order = deduction_order(C, owned)
  if units < 0 then
    local entries, rest = refund(order, -units)
    return outcome(rest == 0, entries, rest)
  end
  snapshot(order.buckets)
  local entries, rest = deduct(order, units)
  if rest == 0 then
    return outcome(true, entries, 0)
  elseif behavior == 'reject' then
    restore(order.buckets)
    local o = outcome(false, {}, rest)
    o.insufficient = true
    return o
  elseif behavior == 'cap' then
    return outcome(false, entries, rest)
  end
  rest = overflow(order, entries, rest)
  return outcome(rest == 0, entries, rest)
end

---------------------------------------------------------------------------
-- Limits (issue 13): the twin of src/limits.rs and of the limit rules of
-- src/rules.rs (judge, take_limits, refund_limits, release_limits, track's
-- largest fitting take). A customer's limits and their counters are one
-- field of its hash, LIMITS_FIELD (README § 11), read only when the record
-- carries LIMITS_FLAG; a limit's table:
--   id, feature, kind ('f' fixed window, 's' sliding, 'r' rate), enabled,
--   shadow, billing (anchor billing_cycle), code, count, q (a window's
--   limit, a rate's rate), burst, head (the stored definition, verbatim),
--   c1, c2, c3: window start (nil never), used, previous; a rate's TAT as
--   c1 * rate + c2 (0 <= c2 < rate): ms x rate_raw without a 2^53 product.
---------------------------------------------------------------------------
-- One stored limit (a \30-separated part of the field).
function LIM.decode_one(ls)
  local f = split(ls, US)
  local flags = f[4] or ''
  local head = {}
  for k = 1, 9 do
    head[k] = f[k] or ''
  end
  local l = {
    id = f[1],
    feature = f[2],
    kind = f[3],
    enabled = find(flags, 'x', 1, true) == nil,
    shadow = find(flags, 'h', 1, true) ~= nil,
    billing = find(flags, 'b', 1, true) ~= nil,
    code = d36(f[6]) or 0,
    count = d36(f[7]) or 1,
    q = d36(f[8]) or 0,
    burst = d36(f[9]) or 0,
    head = concat(head, US),
    c1 = d36(f[10]),
    c2 = d36(f[11]) or 0,
    c3 = d36(f[12]) or 0,
  }
  if f[3] == 'r' then
    l.c1 = l.c1 or 0
  end
  return l
end

function LIM.decode(s)
  local out = {}
  if s == nil or s == '' then
    return out
  end
  for i, ls in ipairs(split(s, RS)) do
    out[i] = LIM.decode_one(ls)
  end
  return out
end

-- c1s: the stored form of l.c1 when the caller has it.
function LIM.encode_one(l, c1s)
  local s = l.head .. US .. (c1s or o36(l.c1)) .. US .. (l.c2 ~= 0 and e36(l.c2) or '') .. US .. (l.c3 ~= 0 and e36(l.c3) or '')
  local n = #s
  while byte(s, n) == 31 do -- trailing empty fields dropped
    n = n - 1
  end
  if n < #s then
    return sub(s, 1, n)
  end
  return s
end

function LIM.encode(list)
  local parts = {}
  for i, l in ipairs(list) do
    parts[i] = LIM.encode_one(l)
  end
  return concat(parts, RS)
end

-- Reads the customer's limits (once): from load_all's HGETALL, or one HGET.
function LIM.load(C)
  if C.limits == nil then
    local s = ''
    if C.has_limits then
      s = C.limits_raw or rcall('HGET', C.key, LIMITS_FIELD) or ''
    end
    C.limits_src = s
    C.limits = LIM.decode(s)
  end
  return C.limits
end

-- The quota: a window's limit, a rate's burst.
function LIM.quota(l)
  if l.kind == 'r' then
    return l.burst
  end
  return l.q
end

function LIM.period_ms(l)
  local p = make_period(l.code, l.count)
  return p and p.ms
end

-- limits::window_at
function LIM.window_at(code, count, anchor, t)
  local p = make_period(code, count)
  if not p then
    return -HUGE, HUGE
  end
  local i = last_index_at_or_before(p, anchor, t)
  return boundary(p, anchor, i), boundary(p, anchor, i + 1)
end

-- rules::billing_anchor: the anchor of the first resetting bucket (stored
-- order: pool by pool) of the pools that pay for the limit's feature: the
-- request's pools when the limit is on the requested feature, else the
-- limit's own pool (a credit system: Catalog::pools_for gives it alone).
function LIM.anchor(C, l)
  if l.kind == 'r' then
    return 0
  end
  local utc = l.code == 4 and 4 * DAY or 0 -- weeks from Monday 1970-01-05
  if not l.billing then
    return utc
  end
  local names
  if l.feature == C.lim_feature and C.lim_pools then
    names = C.lim_pools
  else
    names = { { pool = l.feature } }
  end
  for _, p in ipairs(names) do
    local P = C.pools[p.pool]
    if P then
      for _, b in ipairs(P.buckets) do
        if b.period then
          return b.anchor
        end
      end
    end
  end
  return utc
end

-- ArmedLimit::view: the counter rolled to now's window (not stored).
function LIM.view(l, anchor, now)
  if l.kind == 'r' then
    return { start = now, stop = now, now = now, anchor = anchor, T = l.c1, F = l.c2 }
  end
  local p = make_period(l.code, l.count)
  local ms = p and p.ms
  local s, e
  if ms then -- window_at inline: boundary(i) = anchor + i * ms
    local i = floor((now - anchor) / ms)
    while anchor + (i + 1) * ms <= now do
      i = i + 1
    end
    while anchor + i * ms > now do
      i = i - 1
    end
    s, e = anchor + i * ms, anchor + (i + 1) * ms
  else
    s, e = LIM.window_at(l.code, l.count, anchor, now)
  end
  local used, prev = l.c2, l.c3
  if l.c1 ~= s then
    local stored_end = nil
    if l.c1 ~= nil then
      local _, se = LIM.window_at(l.code, l.count, anchor, l.c1)
      stored_end = se
    end
    if stored_end == s and l.c1 < s then
      prev = used
    else
      prev = 0
    end
    used = 0
  end
  return { start = s, stop = e, now = now, anchor = anchor, used = used, prev = prev }
end

function LIM.bn_add(a, b)
  local r, carry = {}, 0
  for i = 1, max(#a, #b) do
    local v = (a[i] or 0) + (b[i] or 0) + carry
    if v >= BASE then
      r[i], carry = v - BASE, 1
    else
      r[i], carry = v, 0
    end
  end
  if carry > 0 then
    r[#r + 1] = carry
  end
  return r
end

function LIM.bn_sub(a, b) -- a >= b
  local r, borrow = {}, 0
  for i = 1, #a do
    local v = a[i] - (b[i] or 0) - borrow
    if v < 0 then
      r[i], borrow = v + BASE, 1
    else
      r[i], borrow = v, 0
    end
  end
  return r
end

function LIM.bn_num(t)
  local n = 0
  for i = #t, 1, -1 do
    n = n * BASE + t[i]
  end
  return n
end

-- floor((a*b + c) / d) exactly (a, b, c >= 0, d > 0, all below 2^53), and
-- whether the division is exact.
function LIM.floor_lin(a, b, c, d)
  local x = a * b
  if x + c < 9.0e15 then
    local n = x + c
    local q = floor(n / d)
    return q, q * d == n
  end
  local q = floor((x + c) / d)
  if q >= HUGE - 8 then
    return q, false
  end
  local N = LIM.bn_add(bn_mul(bn(a), bn(b)), bn(c))
  local D = bn(d)
  while q > 0 and bn_cmp(bn_mul(bn(q), D), N) > 0 do
    q = q - 1
  end
  while bn_cmp(bn_mul(bn(q + 1), D), N) <= 0 do
    q = q + 1
  end
  return q, bn_cmp(bn_mul(bn(q), D), N) == 0
end

-- a*b = q*c + r, 0 <= r < c.
function LIM.divmod(a, b, c)
  local x = a * b
  if x < 9.0e15 then
    local q = floor(x / c)
    return q, x - q * c
  end
  local q = LIM.floor_lin(a, b, 0, c)
  return q, LIM.bn_num(LIM.bn_sub(bn_mul(bn(a), bn(b)), bn_mul(bn(q), bn(c))))
end

-- max(tat, now x rate) as (T, F).
function LIM.rate_m(v)
  if v.T >= v.now then
    return v.T, v.F
  end
  return v.now, 0
end

-- ArmedLimit::used
function LIM.used(l, v)
  if l.kind == 'r' then
    local p = LIM.period_ms(l)
    if not p then
      return 0
    end
    local T, F = LIM.rate_m(v)
    local q, exact = LIM.floor_lin(T - v.now, l.q, F, p)
    return exact and q or q + 1
  end
  if l.kind ~= 's' or v.prev == 0 then
    return v.used
  end
  local q, exact = muldiv(v.prev, v.stop - v.now, v.stop - v.start)
  return v.used + (exact and q or q + 1)
end

-- ArmedLimit::room
function LIM.room(l, v)
  if l.kind == 'r' and not LIM.period_ms(l) then
    return 0
  end
  return max(LIM.quota(l) - LIM.used(l, v), 0)
end

-- ArmedLimit::take (stored).
function LIM.take(l, v, amount)
  if l.kind == 'r' then
    local p = LIM.period_ms(l)
    if not p then
      return
    end
    local T, F = LIM.rate_m(v)
    local q, rem = LIM.divmod(amount, p, l.q)
    T, F = T + q, F + rem
    if F >= l.q then
      T, F = T + 1, F - l.q
    end
    -- limits.rs: never past MAX_INSTANT + 1 (only a shadow limit gets there).
    if T > MAX_INSTANT + 1 or (T == MAX_INSTANT + 1 and F > 0) then
      T, F = MAX_INSTANT + 1, 0
    end
    l.c1, l.c2 = T, F
    return
  end
  l.c1, l.c2, l.c3 = v.start, v.used + amount, v.prev
end

-- ArmedLimit::give_back (stored).
function LIM.give_back(l, v, amount, window_start, rate_too)
  if l.kind == 'r' then
    local p = LIM.period_ms(l)
    if not p or not rate_too then
      return
    end
    local T, F = v.T, v.F
    local q, rem = LIM.divmod(amount, p, l.q)
    local T2, F2 = T - q, F - rem
    if F2 < 0 then
      T2, F2 = T2 - 1, F2 + l.q
    end
    if T2 < v.now then
      T2, F2 = v.now, 0
    end
    if T2 < T or (T2 == T and F2 < F) then
      l.c1, l.c2 = T2, F2
    end
    return
  end
  if v.start == window_start then
    l.c1, l.c2, l.c3 = v.start, v.used - max(min(amount, v.used), 0), v.prev
  end
end

-- ArmedLimit::frees_at: nil = never (more than the quota).
function LIM.frees_at(l, v, amount)
  if amount > LIM.quota(l) then
    return nil
  end
  if amount <= LIM.room(l, v) then
    return v.now
  end
  if l.kind == 'r' then
    local p = LIM.period_ms(l)
    if not p then
      return nil
    end
    local qk, rk = LIM.divmod(l.burst - amount, p, l.q)
    local t = v.T - qk + ((v.F > rk) and 1 or 0)
    return max(t, v.now)
  elseif l.kind == 'f' then
    return v.stop
  end
  local r = l.q - amount
  local function earliest(x, rr, lo, stop, len)
    if rr < 0 then
      return nil
    end
    if x == 0 then
      return lo
    end
    local t = stop - muldiv(rr, len, x)
    if t < lo then
      return lo
    elseif t > stop then
      return stop
    end
    return t
  end
  local t = earliest(v.prev, r - v.used, v.now, v.stop, v.stop - v.start)
  if t and t < v.stop then
    return t
  end
  local ns, ne = LIM.window_at(l.code, l.count, v.anchor, v.stop)
  return earliest(v.used, r, ns, ne, ne - ns)
end

-- rules::applicable_limits for the request (C.lim_feature, C.lim_pools):
-- sets C.lim (nil when none applies).
function LIM.setup(C, feature, pools)
  C.lim = nil
  if not C.has_limits then
    return
  end
  C.lim_feature, C.lim_pools = feature, pools
  local app = {}
  for _, l in ipairs(LIM.load(C)) do
    local on = l.enabled and l.feature == feature
    if l.enabled and not on and pools then
      for _, p in ipairs(pools) do
        if p.pool == l.feature then
          on = true
          break
        end
      end
    end
    if on then
      app[#app + 1] = l
    end
  end
  if app[1] then
    C.lim = app
  end
end

-- rules::take_of: units of the requested feature, or credits charged to
-- the limit's pool.
function LIM.take_of(C, l, entries)
  local n = 0
  if l.feature == C.lim_feature then
    for _, e in ipairs(entries) do
      n = n + e.units
    end
  else
    for _, e in ipairs(entries) do
      if e.pool == l.feature then
        n = n + e.amount
      end
    end
  end
  return n
end

-- rules::judge: { blocked = { id, frees_at } | nil, shadow = { ids }, takes = { { l, amount } } }.
function LIM.judge(C, entries)
  local J = { blocked = nil, shadow = {}, takes = {} }
  for _, l in ipairs(C.lim) do
    local amount = max(LIM.take_of(C, l, entries), 0)
    local v = LIM.view(l, LIM.anchor(C, l), C.now)
    if amount > LIM.room(l, v) then
      if l.shadow then
        J.shadow[#J.shadow + 1] = l.id
      else
        local d = { id = l.id, frees_at = LIM.frees_at(l, v, amount) }
        local b = J.blocked
        local later
        if b == nil then
          later = true
        elseif b.frees_at == nil then
          later = false
        elseif d.frees_at == nil then
          later = true
        else
          later = d.frees_at > b.frees_at
        end
        if later then
          J.blocked = d
        end
      end
    end
    J.takes[#J.takes + 1] = { l, amount }
  end
  return J
end

-- rules::take_limits: returns the holds { id, window start, amount }.
function LIM.take_all(C, takes)
  local holds = {}
  for _, t in ipairs(takes) do
    local l, amount = t[1], t[2]
    local v = LIM.view(l, LIM.anchor(C, l), C.now)
    LIM.take(l, v, amount)
    if amount > 0 then
      holds[#holds + 1] = { l.id, v.start, amount }
    end
  end
  return holds
end

-- rules::refund_limits
function LIM.refund(C, entries)
  for _, l in ipairs(C.lim) do
    local back = -LIM.take_of(C, l, entries)
    if back > 0 then
      local v = LIM.view(l, LIM.anchor(C, l), C.now)
      LIM.give_back(l, v, back, v.start, false)
    end
  end
end

function LIM.by_id(C, id)
  for _, l in ipairs(LIM.load(C)) do
    if l.id == id then
      return l
    end
  end
  return nil
end

-- rules::release_limits (a finalize's release): windows anchored as the
-- request would anchor them.
function LIM.release(C, holds)
  for _, h in ipairs(holds or NONE) do
    local l = LIM.by_id(C, h[1])
    if l then
      local v = LIM.view(l, LIM.anchor(C, l), C.now)
      LIM.give_back(l, v, h[3], h[2], true)
    end
  end
end

-- rules::release_expired_holds (prepare): the hold's window start is the anchor.
function LIM.release_expired(C, holds)
  if not C.has_limits then
    return
  end
  for _, h in ipairs(holds or NONE) do
    local l = LIM.by_id(C, h[1])
    if l then
      local v = LIM.view(l, h[2], C.now)
      LIM.give_back(l, v, h[3], h[2], true)
    end
  end
end

-- rules::track with limits on the feature (C.lim set).
function LIM.track_rule(C, pools, units, behavior)
  local owned = owned_pools(C, pools)
  if #owned == 0 then
    return no_balance(units, behavior == 'reject' and units > 0)
  end
  local order = deduction_order(C, owned)
  if units < 0 then
    local entries, rest = refund(order, -units)
    LIM.refund(C, entries)
    return outcome(rest == 0, entries, rest)
  end
  snapshot(order.buckets)
  snapshot(order.unlimited)
  local function attempt(u)
    restore(order.buckets)
    restore(order.unlimited)
    local entries, rest = deduct(order, u)
    if behavior == 'overflow' and rest > 0 then
      rest = overflow(order, entries, rest)
    end
    return entries, rest
  end
  local first, rest = attempt(units)
  if behavior == 'reject' and rest > 0 then
    restore(order.buckets)
    restore(order.unlimited)
    local o = outcome(false, {}, rest)
    o.insufficient = true
    return o
  end
  local J = LIM.judge(C, first)
  local take = units
  if J.blocked then
    if behavior == 'reject' then
      restore(order.buckets)
      restore(order.unlimited)
      local o = outcome(false, {}, units)
      o.limit, o.shadow = J.blocked, J.shadow
      return o
    end
    local function fits(u)
      return LIM.judge(C, (attempt(u))).blocked == nil
    end
    local hi = units - rest
    if hi <= 0 or fits(hi) then
      take = max(hi, 0)
    else
      local lo = 0
      while hi - lo > 1 do
        local mid = lo + floor((hi - lo) / 2)
        if fits(mid) then
          lo = mid
        else
          hi = mid
        end
      end
      take = lo
    end
  end
  local entries, rest2 = attempt(take)
  local J2 = LIM.judge(C, entries)
  local dropped = units - take + rest2
  local o = outcome(dropped == 0, entries, dropped)
  o.shadow = J2.shadow
  LIM.take_all(C, J2.takes)
  return o
end

-- The reply's limits pair (after the pools): the name LIMITS_FIELD ..
-- `<denying id>\31<frees_at>` \30 `<shadow ids, \31>` (LIMITS_NONE when
-- neither), the value the customer's limits field after the operation
-- (README § 11) when the reply shows a feature, '' otherwise: the sidecar
-- derives each applicable limit's status from it (rules::limit_statuses),
-- so Redis formats none. Appended when the customer holds limits.
function LIM.with_reply(C, r, o, feature, pools)
  if C.has_limits or o.limit or (o.shadow and o.shadow[1]) then
    local denial = ''
    if o.limit then
      denial = o.limit.id .. US .. opt(o.limit.frees_at)
    end
    local field = ''
    if feature and feature ~= '' and C.has_limits then
      field = C.limits_out or LIM.encode(LIM.load(C))
    end
    r[#r + 1] = LIMITS_FIELD .. denial .. RS .. concat(o.shadow or NONE, US)
    r[#r + 1] = field
  end
  return r
end

-- Definitions met on the hot path, by their stored fields 1-9 (only
-- set_limits changes a definition, so the same bytes are the same limit),
-- decoded once per Lua state with the constant parts of their reply
-- status; emptied past 512. `ms`: a window of a fixed length (not
-- billing-anchored), judged inline (LIM.wview); anything else (rates,
-- calendar windows) through the general functions on a table of its
-- counters whose other fields come from the definition (metatable).
LIM.defs, LIM.ndefs = {}, 0
LIM.app = {} -- the hot path's applicable limits, reused from call to call (entries 1..n)
LIM.mru = {} -- the last 4 definitions met whose bytes end with field 9's separator (LIM.def's `full`)
-- Fields 10-12 (the counter) after a definition recognised whole.
LIM.CTR = '^\31([^\30\31]*)\31?([^\30\31]*)\31?([^\30\31]*)'
-- Field 2 (the feature), the end of field 9, fields 10-12 (the counter).
LIM.HEAD = '^[^\30\31]*\31([^\30\31]*)\31[^\30\31]*\31[^\30\31]*\31[^\30\31]*\31[^\30\31]*\31[^\30\31]*\31[^\30\31]*\31?[^\30\31]*()\31?([^\30\31]*)\31?([^\30\31]*)\31?([^\30\31]*)'

function LIM.def(hk)
  local d = LIM.decode_one(hk)
  d.c1, d.c2, d.c3 = nil, nil, nil
  local p = make_period(d.code, d.count)
  if not d.billing or d.kind == 'r' then
    d.anchor = LIM.anchor(nil, d)
    if d.kind ~= 'r' and p and p.ms then
      d.ms = p.ms
    end
  end
  d.mt = { __index = d }
  -- Fields 1-9 with field 9's separator: the bytes can only begin a part
  -- that holds this very definition (LIM.fast_setup's recognition).
  local _, seps = string.gsub(hk, US, '')
  d.full = seps == 8
  if LIM.ndefs >= 512 then
    LIM.defs, LIM.ndefs = {}, 0
  end
  LIM.defs[hk] = d
  LIM.ndefs = LIM.ndefs + 1
  return d
end

-- rules::applicable_limits for the hot path: LIM.setup's choice (enabled,
-- on the feature or one of the request's pools), in stored order: their
-- number n, entries 1..n of LIM.app, each
-- { [1] definition, [2] first byte, [3] last byte (its part of ls),
-- [4..6] c1, c2, c3 (the counter), [7] c1 as stored, [8..11] the judge's
-- view (start, stop, used, prev), [12] amount, [13] the counter table and
-- [14] its view (LIM.view) when not judged inline }; only those are
-- decoded. false when the general path must judge: a billing_cycle window
-- (its anchor is a bucket's), a malformed part.
function LIM.fast_setup(ls, feature, args, at, np)
  local app, n, pos, len = LIM.app, 0, 1, #ls
  local mru = LIM.mru
  while pos <= len do
    local e = find(ls, RS, pos, true)
    local stop = (e or len + 1) - 1
    -- The definition: one of the last met (plans' limits are the same bytes
    -- for every customer of the plan), recognised by one plain find, or the
    -- pattern.
    local f, h9, c1s, c2s, c3s, d = nil, nil, '', '', '', nil
    for k = 1, #mru do
      local m = mru[k]
      local h = pos + #m
      if find(ls, m, pos, true) == pos and (h > stop or byte(ls, h) == 31) then
        d = LIM.defs[m] or LIM.def(m)
        f, h9 = d.feature, h
        if h <= stop then
          c1s, c2s, c3s = match(ls, LIM.CTR, h)
        end
        break
      end
    end
    if not d then
      f, h9, c1s, c2s, c3s = match(ls, LIM.HEAD, pos)
      if not f then
        return false
      end
    end
    local on = f == feature
    if not on then
      for pi = 1, np do
        if args[at + 2 * pi - 1] == f then
          on = true
          break
        end
      end
    end
    if on then
      if not d then
        local hk = sub(ls, pos, h9 - 1)
        d = LIM.defs[hk] or LIM.def(hk)
        if d.full and mru[1] ~= hk then
          table.insert(mru, 1, hk)
          mru[5] = nil
        end
      end
      if d.enabled then
        if d.billing and d.kind ~= 'r' then
          return false
        end
        local c1 = nil
        if c1s ~= '' then
          c1 = byte(c1s, 1) == 45 and d36(c1s) or tonumber(c1s, 36)
        elseif d.kind == 'r' then
          c1 = 0
        end
        n = n + 1
        local a = app[n]
        if not a then
          a = { false, 0, 0, 0, 0, 0, '', 0, 0, 0, 0, 0, false, false }
          app[n] = a
        end
        local c2 = 0
        if c2s ~= '' then
          c2 = byte(c2s, 1) == 45 and d36(c2s) or tonumber(c2s, 36)
        end
        a[1], a[2], a[3], a[4], a[5], a[6], a[7] = d, pos, stop, c1, c2, c3s == '' and 0 or d36(c3s), c1s
        a[13], a[14] = false, false
      end
    end
    if not e then
      break
    end
    pos = e + 1
  end
  return n
end

-- LIM.view of a window of fixed length d.ms, as values: start, stop, used, prev.
function LIM.wview(d, c1, used, prev, now)
  local anchor, ms = d.anchor, d.ms
  local i = floor((now - anchor) / ms)
  while anchor + (i + 1) * ms <= now do
    i = i + 1
  end
  while anchor + i * ms > now do
    i = i - 1
  end
  local s = anchor + i * ms
  if c1 ~= s then
    local stored_end = nil
    if c1 ~= nil then
      local _, se = LIM.window_at(d.code, d.count, anchor, c1)
      stored_end = se
    end
    if stored_end == s and c1 < s then
      prev = used
    else
      prev = 0
    end
    used = 0
  end
  return s, anchor + (i + 1) * ms, used, prev
end

-- LIM.room of that view.
function LIM.wroom(d, s, e, used, prev, now)
  if d.kind == 's' and prev ~= 0 then
    local q, exact = muldiv(prev, e - now, e - s)
    used = used + (exact and q or q + 1)
  end
  return max(d.q - used, 0)
end

---------------------------------------------------------------------------
-- Replies. An outcome is one flat array (no nested tables: each element of
-- a reply costs Redis a conversion, a nested table several):
--   [1] flags: the sum of RF_ALLOWED (1: allowed; track: nothing dropped),
--       RF_NO_BALANCE (2), RF_INSUFFICIENT (4), RF_REPLAYED (8)
--   [2] uncovered units  [3] now, the instant used
--   [4] entries: '' or entries joined by \30, each
--       <pool>\31<balance id>\31<kind>\31<amount>\31<units> (decimal
--       integers; kind '' a bucket, 'r' a rollover row that never expires,
--       'r<expires_at>' one that does)
--   [5] the feature whose pools follow ('' none)
--   [6..] pool, pool string (README § 6.2; '' none owned), for each pool
--       of that feature in deduction order, after the operation
---------------------------------------------------------------------------
local RF_ALLOWED, RF_NO_BALANCE, RF_INSUFFICIENT, RF_REPLAYED = 1, 2, 4, 8

local function entry_string(e)
  local kind = ''
  if e.kind == 'r' then
    kind = e.rollover_expires_at and ('r' .. fmt(e.rollover_expires_at)) or 'r'
  end
  return e.pool .. US .. e.balance_id .. US .. kind .. US .. fmt(e.amount) .. US .. fmt(e.units)
end

local function outcome_reply(now, o, replayed, feature, pool_strings)
  local es = {}
  for i, e in ipairs(o.entries) do
    es[i] = entry_string(e)
  end
  local flags = (o.allowed and RF_ALLOWED or 0) + (o.no_balance and RF_NO_BALANCE or 0)
    + (o.insufficient and RF_INSUFFICIENT or 0) + (replayed and RF_REPLAYED or 0)
  local r = { flags, o.uncovered, now, concat(es, RS), feature or '' }
  for i, v in ipairs(pool_strings) do
    r[5 + i] = v
  end
  return r
end

---------------------------------------------------------------------------
-- Idempotency records. Key <due index key>:i:<window start, base 36>: a hash
-- per cluster slot (the due index's slot tag: the customer's slot, so the
-- key overhead is shared by every customer of the slot) and window of
-- W = retention ms (windows start at multiples of W); a record written at
-- `now` goes to the window holding now, whose key lives until window start
-- + 2W (PX), past every record's expiry. Field: the first 12 bytes of
-- SHA1(customer id \31 idempotency key). Value (see README-cg2.md):
--   4 bytes SHA1(fingerprint) | e36(expires_at - window start) \31
--   flags digit | e36(uncovered) { \30 pool ref \31 balance id \31 kind \31
--   e36(amount) \31 e36(units) }
---------------------------------------------------------------------------
local function digest(s, hex)
  return (gsub(sub(sha1hex(s), 1, hex), '..', HEX))
end

local function idem_window(C)
  local w = max(C.ret_idem, 1)
  return floor(C.now / w) * w, w
end

local function idem_encode(o, expires_off, pools)
  local flags = (o.allowed and OF_ALLOWED or 0) + (o.no_balance and OF_NO_BALANCE or 0) + (o.insufficient and OF_INSUFFICIENT or 0)
  local parts = { e36(expires_off) .. US .. fmt(flags) .. e36(o.uncovered) }
  for i, e in ipairs(o.entries) do
    local ref = nil
    for pi, p in ipairs(pools or {}) do
      if p.pool == e.pool then
        ref = e36(pi)
        break
      end
    end
    local kind = ''
    if e.kind == 'r' then
      kind = e.rollover_expires_at and e36(e.rollover_expires_at) or '*'
    end
    parts[i + 1] = (ref or ('=' .. e.pool)) .. US .. e.balance_id .. US .. kind .. US .. e36(e.amount) .. US .. e36(e.units)
  end
  -- Limits: `!<denying id>\31<frees_at>\31<shadow ids joined by \29>`.
  if o.limit or (o.shadow and o.shadow[1]) then
    local l = o.limit
    parts[#parts + 1] = '!' .. (l and l.id or '') .. US .. (l and o36(l.frees_at) or '') .. US .. concat(o.shadow or NONE, GS)
  end
  return concat(parts, RS)
end

local function idem_decode(v, start, pools)
  local parts = split(sub(v, IDEM_FP_BYTES + 1), RS)
  local head = parts[1]
  local j = find(head, US, 1, true)
  local expires_at = start + d36(sub(head, 1, j - 1))
  local flags = tonumber(sub(head, j + 1, j + 1))
  local o = outcome(flags % 2 == 1, {}, d36(sub(head, j + 2)))
  o.no_balance = floor(flags / OF_NO_BALANCE) % 2 == 1
  o.insufficient = floor(flags / OF_INSUFFICIENT) % 2 == 1
  for i = 2, #parts do
    local f = split(parts[i], US)
    if sub(f[1], 1, 1) == '!' then
      if f[1] ~= '!' then
        o.limit = { id = sub(f[1], 2), frees_at = d36(f[2]) }
      end
      if f[3] and f[3] ~= '' then
        o.shadow = split(f[3], GS)
      end
      break
    end
    local pool
    if sub(f[1], 1, 1) == '=' then
      pool = sub(f[1], 2)
    else
      local p = pools and pools[d36(f[1])]
      pool = p and p.pool or ''
    end
    local e = { balance_id = f[2], pool = pool, kind = 'b', amount = d36(f[4]), units = d36(f[5]) }
    if f[3] ~= '' then
      e.kind = 'r'
      if f[3] ~= '*' then
        e.rollover_expires_at = d36(f[3])
      end
    end
    o.entries[i - 1] = e
  end
  return o, expires_at
end

-- The live record of `key`: its fingerprint digest and outcome, or nil.
local function idem_get(C, key, pools)
  local start, w = idem_window(C)
  local field = digest(C.member .. US .. key, IDEM_KEY_HEX)
  local base = C.due_key .. ':i:'
  local v = rcall('HGET', base .. e36(start), field)
  if not v then
    start = start - w
    v = rcall('HGET', base .. e36(start), field)
    if not v then
      return nil, field
    end
  end
  local o, expires_at = idem_decode(v, start, pools)
  if expires_at <= C.now then
    return nil, field
  end
  return { fp = sub(v, 1, IDEM_FP_BYTES), outcome = o }, field
end

local function idem_put(C, field, fp, o, pools)
  local start, w = idem_window(C)
  local k = C.due_key .. ':i:' .. e36(start)
  local expires_at = C.now + C.ret_idem
  rcall('HSET', k, field, fp .. idem_encode(o, expires_at - start, pools))
  rcall('PEXPIRE', k, max(1, start + 2 * w - C.now), 'NX')
end

---------------------------------------------------------------------------
-- The hot path: check, consume, and track of units >= 0 when nothing of the
-- customer is due and no bucket of the paying pools carries the COMPLEX
-- marker (no unlimited or overage bucket, no rollover rows). Then
-- rules::deduction_order is the pools' stored lists one after the other,
-- with no unlimited source and no rollover, and rules::deduct is its first
-- pass alone (the second pass only takes overage buckets); every bucket is
-- one source, so record() never merges (but overflow may, on the first
-- bucket). Works on the strings and a few parallel arrays, not on bucket
-- tables. Returns nil (nothing done) when the general path must run, with
-- the HMGET reply for it to reuse. benches/cg2_diff.py holds both paths to
-- the cg1 scripts.
---------------------------------------------------------------------------
-- The instant the customer next changes by itself: min(bucket_due,
-- lock_due) of the record (fields 3 and 4), nil when nothing will.
local function record_due(rec)
  local i = find(rec, US, 1, true)
  local j = i and find(rec, US, i + 1, true)
  if not j then
    return nil
  end
  local k = find(rec, US, j + 1, true)
  if not k then
    return d36(sub(rec, j + 1))
  end
  -- A customer with limits has a 5th field (the flag).
  local m = find(rec, US, k + 1, true)
  return opt_min(d36(sub(rec, j + 1, k - 1)), d36(sub(rec, k + 1, (m or 0) - 1)))
end

-- op: 'check' | 'consume' | 'track'; key: idempotency key or ''; the
-- pools are the pool, cost pairs from args[at] on, read in place (no table
-- per pool). Buckets are read lazily in deduction order, only as far as
-- the deduction goes: a consume the first bucket covers reads one bucket.
---------------------------------------------------------------------------
-- The ledger (issue 14, README § 12). With a cap in ARGV[2] (retention's
-- third part), every change of a balance or a limit counter appends one
-- entry to the slot's stream <due key>:ledger in this same call, encoded as
-- src/ledger/codec.rs decodes it. A call whose entries would take the
-- stream past `cap` refuses with store_full before it writes anything (the
-- drain is behind: never a change without its entry).
-- Entries are diffs of snapshots (a balance's remaining plus its rollover
-- rows; a limit's counter), queued on C.led and added by save() after every
-- other write: nothing may fail after the first XADD, as a script's writes
-- are not undone.
---------------------------------------------------------------------------
LED.GROUP = 'creditgate-ledger' -- src/ledger/drain.rs: GROUP

function LED.stream(due_key)
  return due_key .. ':ledger'
end

-- Refuses when `adding` entries would take the stream past `cap`; creates
-- the stream with the drain's group the first time (at 0: nothing written
-- before is skipped).
function LED.guard(due_key, cap, adding)
  local s = LED.stream(due_key)
  local n = rcall('XLEN', s)
  if n + adding > cap then
    fail('store_full', 'ledger stream full')
  end
  if n == 0 and rcall('EXISTS', s) == 0 then
    rcall('XGROUP', 'CREATE', s, LED.GROUP, '0', 'MKSTREAM')
  end
end

-- The customer id: the key's tag with its escapes (%XX) undone.
function LED.customer(key)
  local t = tag_of(key)
  if find(t, '%', 1, true) then
    t = (gsub(t, '%%(%x%x)', function(h)
      return char(tonumber(h, 16))
    end))
  end
  return t
end

function LED.total(b)
  local t = b.remaining
  for _, r in ipairs(b.rollovers) do
    t = t + r.balance
  end
  return t
end

-- A limit's counter: window { kind, start, used }, rate { 'r', c1, c2 }.
function LED.counters(list)
  local out = {}
  for _, l in ipairs(list) do
    out[l.id] = { l.kind, l.c1, l.c2, l.q }
  end
  return out
end

function LED.snap(C)
  local bs = {}
  for _, name in ipairs(C.pool_list) do
    for _, b in ipairs(C.pools[name].buckets) do
      bs[#bs + 1] = { b.id, name, b, LED.total(b) }
    end
  end
  return { b = bs, l = C.limits and LED.counters(C.limits) or nil }
end

function LED.item(id, pool, plan, amount)
  return id .. GS .. pool .. GS .. (plan or '') .. GS .. fmt(amount)
end

-- a * b + c in decimal, 0 <= a, b, c < 2^53 (a rate's TAT, c1 * rate + c2,
-- may pass 2^53): limbs of 10^6, every partial sum below 2^53.
function LED.mul_add(a, b, c)
  local B = 1000000
  local function limbs(x)
    local x0 = x % B
    local x1 = (x - x0) / B
    local y1 = x1 % B
    return { x0, y1, (x1 - y1) / B }
  end
  local x, y, z = limbs(a), limbs(b), limbs(c)
  local p = { z[1], z[2], z[3], 0, 0, 0 }
  for i = 1, 3 do
    for j = 1, 3 do
      p[i + j - 1] = p[i + j - 1] + x[i] * y[j]
    end
  end
  local carry = 0
  for k = 1, 6 do
    local v = p[k] + carry
    local r = v % B
    p[k], carry = r, (v - r) / B
  end
  local top = 6
  while top > 1 and p[top] == 0 do
    top = top - 1
  end
  local parts = { fmt(p[top]) }
  for k = top - 1, 1, -1 do
    parts[#parts + 1] = format('%06d', p[k])
  end
  return concat(parts)
end

-- The limit items from counters `w` (before) to `list` (after), as
-- Snapshot::diff: a window's used in its window (a window rolled over with
-- nothing used needs none), a rate's TAT when it moved.
function LED.limit_items(w, list)
  local out, seen = {}, {}
  for _, l in ipairs(list) do
    seen[l.id] = true
    local b = w[l.id]
    if l.kind == 'r' then
      local moved
      if b then
        moved = b[2] ~= l.c1 or b[3] ~= l.c2
      else
        moved = (l.c1 or 0) ~= 0 or l.c2 ~= 0
      end
      if moved then
        out[#out + 1] = l.id .. GS .. GS .. '0' .. GS .. LED.mul_add(l.c1 or 0, max(l.q, 1), l.c2)
      end
    elseif l.c1 then
      local before = (b and b[1] ~= 'r' and b[2] == l.c1) and b[3] or 0
      if l.c2 ~= before then
        out[#out + 1] = l.id .. GS .. fmt(l.c1) .. GS .. fmt(l.c2 - before) .. GS
      end
    end
  end
  for id, b in pairs(w) do
    if not seen[id] then
      if b[1] == 'r' then
        if (b[2] or 0) ~= 0 or b[3] ~= 0 then
          out[#out + 1] = id .. GS .. GS .. '0' .. GS .. '0'
        end
      elseif b[2] and b[3] ~= 0 then
        out[#out + 1] = id .. GS .. fmt(b[2]) .. GS .. fmt(-b[3]) .. GS
      end
    end
  end
  return out
end

-- The balance items from snapshot `s` to C's buckets now.
function LED.balance_items(C, s)
  local items, was, seen = {}, {}, {}
  for _, x in ipairs(s.b) do
    was[x[1]] = x
  end
  for _, name in ipairs(C.pool_list) do
    for _, b in ipairs(C.pools[name].buckets) do
      seen[b.id] = true
      local x = was[b.id]
      local d = LED.total(b) - (x and x[4] or 0)
      if d ~= 0 then
        items[#items + 1] = LED.item(b.id, name, b.plan_id, d)
      end
    end
  end
  for _, x in ipairs(s.b) do
    if not seen[x[1]] and x[4] ~= 0 then
      items[#items + 1] = LED.item(x[1], x[2], x[3].plan_id, -x[4])
    end
  end
  return items
end

-- One encoded entry (codec.rs, version 1).
function LED.encode(now, key, op, feature, units, balances, limits, idem, lock_id)
  return concat({
    '1', fmt(now), LED.customer(key), feature or '', op, fmt(units or 0),
    concat(balances, RS), concat(limits, RS), idem or '', lock_id or '', '',
  }, US)
end

-- Queues the entry for the change from snapshot `s` to now, unless nothing
-- moved (and m.always is not set). m: { op, feature, units, key, lock_id, always }.
function LED.queue(C, s, m)
  local bi = LED.balance_items(C, s)
  local li = NONE
  if C.limits then
    local w = s.l
    if not w then -- read after the snapshot: the stored counters are its
      w = LED.counters(LIM.decode(C.limits_src))
    end
    li = LED.limit_items(w, C.limits)
  end
  if bi[1] == nil and li[1] == nil and not m.always then
    return
  end
  C.led[#C.led + 1] = LED.encode(C.now, C.key, m.op, m.feature, m.units, bi, li, m.key, m.lock_id)
end

function LED.flush(C)
  local q = C.led
  if q and q[1] then
    local s = LED.stream(C.due_key)
    for _, e in ipairs(q) do
      rcall('XADD', s, '*', 'e', e)
    end
    C.led = {}
  end
end

-- apply_op's entry: consume, track, refund (a negative track), reserve
-- (the units held), finalize (always: the held units less what went back,
-- plus what an override took beyond them).
function LED.meta(op, o, feature, units, key, lock_id, held)
  local taken = 0
  for _, e in ipairs(o.entries) do
    taken = taken + e.units
  end
  local m = { op = op, feature = feature, units = taken, key = key ~= '' and key or nil }
  if op == 'track' and units < 0 then
    m.op = 'refund'
  elseif op == 'reserve' then
    m.units, m.lock_id = o.allowed and units or 0, lock_id
  elseif op == 'finalize' then
    m.units, m.lock_id, m.always = (held or 0) + taken, lock_id, true
  end
  return m
end

-- The plan id of the plain bucket starting at `pos` of pool string `ps`:
-- one anchored match, no split (the hot path runs it per bucket drawn on).
-- A bucket whose trailing empty fields were dropped matches nothing: none.
local PLAN_AT -- built on first use: the library's load may not read `string`
function LED.plan_at(ps, pos)
  PLAN_AT = PLAN_AT or ('^' .. string.rep('[^\031\030]*\031', B_PLAN_ID - 1) .. '([^\031\030]*)')
  local p = match(ps, PLAN_AT, pos)
  return p ~= '' and p or nil
end

local function fast_path(keys, args, now, op, key, feature, units, mode, at)
  at = at - 1 -- pool i is args[at + 2i - 1], its cost args[at + 2i]
  local np = (#args - at) / 2
  -- The record, the pools' fields, and the limits' field last (v[np + 2]).
  local v
  if np == 2 then
    v = rcall('HMGET', keys[1], RECORD_FIELD, args[at + 1], args[at + 3], LIMITS_FIELD)
  elseif np == 1 then
    v = rcall('HMGET', keys[1], RECORD_FIELD, args[at + 1], LIMITS_FIELD)
  else
    local fields = { RECORD_FIELD }
    for i, p in ipairs(read_pools(args, at + 1)) do
      fields[i + 1] = p.pool
    end
    fields[np + 2] = LIMITS_FIELD
    v = rcall('HMGET', keys[1], unpack(fields))
  end
  local rec = v[1]
  if not rec then
    fail('customer_not_found')
  end
  local due = record_due(rec)
  if due and due <= now then
    return nil, v
  end
  -- A complex bucket (marked '!' at its start: the pool string's first
  -- byte or right after a \30) anywhere in the paying pools, or a pool
  -- named twice: the general path.
  local owned = false
  for pi = 1, np do
    local ps = v[pi + 1]
    if ps then
      if byte(ps, 1) == COMPLEX_BYTE or find(ps, '\30!', 1, true) then
        return nil, v
      end
      for q = 1, pi - 1 do
        if args[at + 2 * q - 1] == args[at + 2 * pi - 1] then
          return nil, v
        end
      end
      owned = true
    end
  end
  -- A customer with limits (the record's flag): the limits on the feature
  -- and its paying pools, decoded from the field read with the record. An
  -- idempotency key or no feature: the general path.
  local lims, ls, nl = nil, nil, 0
  if find(rec, 'L', 1, true) then
    if key ~= '' or feature == '' then
      return nil, v
    end
    ls = v[np + 2] or ''
    nl = LIM.fast_setup(ls, feature, args, at, np)
    if not nl then
      return nil, v
    end
    lims = LIM.app
  end
  local C, ifield, ifp = nil, nil, nil
  -- The retention argument, parsed once: for the idempotency record and the
  -- ledger's cap (§ 12).
  local cap, ret_parsed = nil, false
  if key ~= '' then
    local fp
    if op == 'consume' then
      fp = 'consume' .. US .. feature .. US .. fmt(units)
    else
      fp = 'track' .. US .. feature .. US .. fmt(units) .. US .. mode
    end
    local ri, _
    ri, _, cap = retention(args[2])
    ret_parsed = true
    C = { key = keys[1], due_key = keys[2], member = tag_of(keys[1]), now = now, ret_idem = ri }
    ifp = digest(fp, IDEM_FP_HEX)
    local found
    C.pools_arg = read_pools(args, at + 1)
    found, ifield = idem_get(C, key, C.pools_arg)
    if found then
      if found.fp ~= ifp then
        fail('idempotency_key_reused')
      end
      local out = {}
      for i = 1, np do
        out[2 * i - 1] = args[at + 2 * i - 1]
        out[2 * i] = v[i + 1] or ''
      end
      return LIM.with_reply(C, outcome_reply(now, found.outcome, true, feature, out), found.outcome, nil, nil)
    end
  end
  -- rules::deduct, first pass (the only one that moves a plain bucket).
  -- es: entries { balance id, pool, amount, units }; W: the buckets to
  -- rewrite, 4 slots each in one flat array: pool index, start, end of the
  -- remaining (exclusive), new remaining; both in deduction order.
  local allowed, uncovered, no_balance, insufficient = true, 0, not owned, false
  local keep = op ~= 'check'
  local es, ne, W, nw = NONE, 0, nil, 0
  if not owned then
    allowed, uncovered, keep = false, units, false
    insufficient = op == 'track' and mode == 'reject' and units > 0
  else
    local need = units
    local first_pi = nil
    for pi = 1, np do
      local ps = v[pi + 1]
      if need == 0 then
        break
      end
      if ps then
        first_pi = first_pi or pi
        local cost = tonumber(args[at + 2 * pi])
        local pos = 1
        while need > 0 do
          local j = find(ps, US, pos, true)
          local rem = d36(sub(ps, pos, j - 1))
          local took, paid = cover(need, rem > 0 and rem or 0, cost)
          if took > 0 then
            need = need - took
            local e = find(ps, US, j + 1, true)
            local r = find(ps, RS, j + 1, true)
            if r and (not e or r < e) then
              e = r
            end
            if ne == 0 then
              es, W = {}, {}
            end
            ne = ne + 1
            es[ne] = { sub(ps, j + 1, (e or 0) - 1), args[at + 2 * pi - 1], paid, took, pi, pos }
            W[nw + 1], W[nw + 2], W[nw + 3], W[nw + 4] = pi, pos, j, rem - paid
            nw = nw + 4
          end
          local r = find(ps, RS, j + 1, true)
          if not r then
            break
          end
          pos = r + 1
        end
      end
    end
    if need > 0 then
      if op ~= 'track' or mode == 'reject' then
        allowed, uncovered, keep, es, ne = false, need, false, NONE, 0
        insufficient = op == 'track'
      elseif mode == 'cap' then
        allowed, uncovered = false, need
      else -- overflow: the rest below zero on the first bucket (rules::overflow)
        first_pi = first_pi or 1
        while not v[first_pi + 1] do
          first_pi = first_pi + 1
        end
        local ps = v[first_pi + 1]
        local paid = charge(need, tonumber(args[at + 2 * first_pi]))
        if W and W[1] == first_pi and W[2] == 1 then
          -- The first bucket paid in the first pass: its entry is the first.
          local nxt = W[4] - paid
          if nxt < -MAX or nxt > MAX then
            fail('amount_out_of_range')
          end
          W[4] = nxt
          es[1][3] = es[1][3] + paid
          es[1][4] = es[1][4] + need
        else
          local j = find(ps, US, 1, true)
          local nxt = d36(sub(ps, 1, j - 1)) - paid
          if nxt < -MAX or nxt > MAX then
            fail('amount_out_of_range')
          end
          local e = find(ps, US, j + 1, true)
          local r = find(ps, RS, j + 1, true)
          if r and (not e or r < e) then
            e = r
          end
          if ne == 0 then
            es, W = {}, {}
          end
          ne = ne + 1
          es[ne] = { sub(ps, j + 1, (e or 0) - 1), args[at + 2 * first_pi - 1], paid, need, first_pi, 1 }
          -- The first bucket goes first in W (W stays in string order).
          for x = nw, 1, -1 do
            W[x + 4] = W[x]
          end
          W[1], W[2], W[3], W[4] = first_pi, 1, j, nxt
          nw = nw + 4
        end
      end
    end
  end
  -- rules::judge (LIM.judge on the entries es): whenever the general rules
  -- judge (a covered check or consume; a track, but a refused reject);
  -- then take_limits when the deduction stays. A track in cap or overflow
  -- mode that a limit refuses searches for the largest fitting take: the
  -- general path (nothing is written yet).
  local blocked, shadow, judged = nil, NONE, false
  if lims and owned and (allowed or (op == 'track' and mode ~= 'reject')) then
    judged = true
    for i = 1, nl do
      local a = lims[i]
      local d = a[1]
      local amount = 0
      if d.feature == feature then
        for k = 1, ne do
          amount = amount + es[k][4]
        end
      else
        for k = 1, ne do
          local e = es[k]
          if e[2] == d.feature then
            amount = amount + e[3]
          end
        end
      end
      if amount < 0 then
        amount = 0
      end
      a[12] = amount
      local room, l, lv
      local ms = d.ms
      if ms then
        local c1, ws, we, wu, wp = a[4], nil, nil, nil, nil
        if c1 and c1 <= now and now < c1 + ms and (c1 - d.anchor) % ms == 0 then
          ws, we, wu, wp = c1, c1 + ms, a[5], a[6] -- the stored window is now's
        else
          ws, we, wu, wp = LIM.wview(d, c1, a[5], a[6], now)
        end
        a[8], a[9], a[10], a[11] = ws, we, wu, wp
        if d.kind == 'f' then
          room = d.q - wu
          if room < 0 then
            room = 0
          end
        else
          room = LIM.wroom(d, ws, we, wu, wp, now)
        end
      else
        l = setmetatable({ c1 = a[4], c2 = a[5], c3 = a[6] }, d.mt)
        lv = LIM.view(l, d.anchor, now)
        a[13], a[14] = l, lv
        room = LIM.room(l, lv)
      end
      if amount > room then
        if d.shadow then
          if shadow == NONE then
            shadow = {}
          end
          shadow[#shadow + 1] = d.id
        else
          if not l then
            l = setmetatable({ c1 = a[4], c2 = a[5], c3 = a[6] }, d.mt)
            lv = { start = a[8], stop = a[9], now = now, anchor = d.anchor, used = a[10], prev = a[11] }
          end
          local dn = { id = d.id, frees_at = LIM.frees_at(l, lv, amount) }
          local later
          if blocked == nil then
            later = true
          elseif blocked.frees_at == nil then
            later = false
          elseif dn.frees_at == nil then
            later = true
          else
            later = dn.frees_at > blocked.frees_at
          end
          if later then
            blocked = dn
          end
        end
      end
    end
    if blocked then
      if op == 'track' and mode ~= 'reject' then
        return nil, v
      end
      allowed, uncovered, keep, es, ne = false, units, false, NONE, 0
    end
  end
  -- The ledger (§ 12): a call that may write an entry refuses before its
  -- first write when the stream is full.
  if not ret_parsed and find(args[2], ',', 1, true) then
    local _
    _, _, cap = retention(args[2])
  end
  if cap and keep and (nw > 0 or (judged and nl > 0)) then
    LED.guard(keys[2], cap, 1)
  end
  -- Write back: each rewritten bucket's new remaining before its unchanged
  -- rest, spliced from the end of each pool string so positions hold; the
  -- limits taken spliced into the limits' field the same way.
  local r = { 0, 0, now, '', feature }
  local hset = nil
  for pi = 1, np do
    r[4 + 2 * pi] = args[at + 2 * pi - 1]
    r[5 + 2 * pi] = v[pi + 1] or ''
  end
  if keep and nw > 0 then
    local x = nw - 3
    while x >= 1 do
      local pi = W[x]
      local ps = r[5 + 2 * pi]
      r[5 + 2 * pi] = sub(ps, 1, W[x + 1] - 1) .. e36(W[x + 3]) .. sub(ps, W[x + 2])
      if x == 1 or W[x - 4] ~= pi then
        if hset then
          hset[#hset + 1] = r[4 + 2 * pi]
          hset[#hset + 1] = r[5 + 2 * pi]
        else
          hset = { r[4 + 2 * pi], r[5 + 2 * pi] }
        end
      end
      x = x - 4
    end
  end
  -- take_limits (LIM.take) and the limits' field with each taken limit's
  -- part re-encoded (LIM.encode_one), the others' bytes unchanged.
  local nls = nil
  if keep and judged and nl > 0 then
    nls = ls
    for i = nl, 1, -1 do
      local a = lims[i]
      local d = a[1]
      local part
      if d.ms then
        local c1, c2, c3 = a[8], a[10] + a[12], a[11]
        if d.pc_n ~= c1 then -- fields 1-10 for this window start, kept by the definition
          d.pc_n, d.pc_s = c1, d.head .. US .. e36(c1)
        end
        part = d.pc_s
        if c3 ~= 0 then
          part = part .. US .. (c2 ~= 0 and e36(c2) or '') .. US .. e36(c3)
        elseif c2 ~= 0 then
          part = part .. US .. e36(c2)
        end
      else
        local l = a[13]
        local c1 = l.c1
        LIM.take(l, a[14], a[12])
        part = LIM.encode_one(l, (l.c1 == c1 and a[7] ~= '') and a[7] or nil)
      end
      if a[2] == 1 and a[3] == #nls then
        nls = part
      else
        nls = sub(nls, 1, a[2] - 1) .. part .. sub(nls, a[3] + 1)
      end
    end
    if nls ~= ls then
      if hset and hset[3] == nil then
        rcall('HSET', keys[1], hset[1], hset[2], LIMITS_FIELD, nls)
        hset = nil
      else
        hset = hset or {}
        hset[#hset + 1] = LIMITS_FIELD
        hset[#hset + 1] = nls
      end
    end
  end
  if hset then
    if hset[3] == nil then
      rcall('HSET', keys[1], hset[1], hset[2])
    else
      rcall('HSET', keys[1], unpack(hset))
    end
  end
  if ifield then
    local o = { allowed = allowed, uncovered = uncovered, no_balance = no_balance, insufficient = insufficient, entries = {} }
    for i = 1, ne do
      local e = es[i]
      o.entries[i] = { balance_id = e[1], pool = e[2], kind = 'b', amount = e[3], units = e[4] }
    end
    idem_put(C, ifield, ifp, o, C.pools_arg)
  end
  if cap and keep then
    local bi, li, taken = {}, {}, 0
    for k = 1, ne do
      local e = es[k]
      taken = taken + e[4]
      if e[3] ~= 0 then
        bi[#bi + 1] = LED.item(e[1], e[2], LED.plan_at(v[e[5] + 1], e[6]), -e[3])
      end
    end
    if judged then
      for i = 1, nl do
        local a = lims[i]
        local d = a[1]
        if d.ms then
          if a[12] ~= 0 then
            li[#li + 1] = d.id .. GS .. fmt(a[8]) .. GS .. fmt(a[12]) .. GS
          end
        else
          local l = a[13]
          if l.c1 ~= a[4] or l.c2 ~= a[5] then
            li[#li + 1] = d.id .. GS .. GS .. '0' .. GS .. LED.mul_add(l.c1 or 0, max(l.q, 1), l.c2)
          end
        end
      end
    end
    if bi[1] or li[1] then
      local entry = LED.encode(now, keys[1], op, feature, taken, bi, li, key ~= '' and key or nil, nil)
      rcall('XADD', LED.stream(keys[2]), '*', 'e', entry)
    end
  end
  -- The reply (outcome_reply's shape); entries: pool, id, '' (a bucket),
  -- amount, units.
  r[1] = (allowed and RF_ALLOWED or 0) + (no_balance and RF_NO_BALANCE or 0) + (insufficient and RF_INSUFFICIENT or 0)
  r[2] = uncovered
  if ne == 1 then
    local e = es[1]
    r[4] = e[2] .. US .. e[1] .. US .. US .. fmt(e[3]) .. US .. fmt(e[4])
  elseif ne > 1 then
    local parts = {}
    for i = 1, ne do
      local e = es[i]
      parts[i] = e[2] .. US .. e[1] .. US .. US .. fmt(e[3]) .. US .. fmt(e[4])
    end
    r[4] = concat(parts, RS)
  end
  -- The limits element (LIM.reply): the denial, the shadow denials, the
  -- limits' field after the operation.
  if lims then
    local head = RS
    if blocked or shadow ~= NONE then
      head = (blocked and (blocked.id .. US .. opt(blocked.frees_at)) or '') .. RS .. concat(shadow, US)
    end
    r[6 + 2 * np] = head == RS and LIMITS_NONE or LIMITS_FIELD .. head
    r[7 + 2 * np] = nls or ls
  end
  return r
end

---------------------------------------------------------------------------
-- The functions. Every function on a customer takes two keys, in one slot:
--   KEYS[1] the customer hash <ns>cg2:{<tag>} (the lock hash <key>:l and the
--           receipts <key>:f:<lock id> are derived from it)
--   KEYS[2] the due index of the customer's slot <ns>cg2:due:{<slot tag>}
--           (the idempotency windows <key>:i:<window> are derived from it)
-- and starts with this header (create_customer: ARGV[1] only):
-- ARGV[1] now: `[<instant ms>][@<deadline ms>]`; no instant = Redis TIME (production: one clock
--         for every sidecar); the deadline (on Redis TIME) refuses a call that starts after it
-- ARGV[2] retention: '' = 24 h for both; '<ms>' for both; '<idempotency ms>,<finalized lock ms>'
---------------------------------------------------------------------------
-- The functions, by operation name (a table: a chunk holds at most 200 locals).
local FNS = {}

function FNS.create_customer(keys, args)
  local now = clock(args[1])
  local created = rcall('HSETNX', keys[1], RECORD_FIELD, e36(now) .. US .. '1')
  return { created, now }
end

-- grant (rules::grant): adds a bucket. Reply { balance id, now }.
-- ARGV[3] pool: the feature or credit system the bucket feeds
-- ARGV[4] balance_id: '' = generated (b<seq>)
-- ARGV[5] plan_id: '' none
-- ARGV[6] granted: per period (x 10^4)
-- ARGV[7] interval: code: 0 one_off, 1 minute, 2 hour, 3 day, 4 week, 5 month, 6 quarter, 7 semi_annual, 8 year
-- ARGV[8] interval_count: '' = 1
-- ARGV[9] next_reset_at: the first reset (ms), '' = one period from now
-- ARGV[10] expires_at: ms, '' never
-- ARGV[11] flags: any of u (unlimited), o (overage_allowed), d (carry_debt)
-- ARGV[12] overage_floor: <= 0 (x 10^4), '' none
-- ARGV[13] rollover: '' none | month | forever
-- ARGV[14] rollover_max: (x 10^4), ''
-- ARGV[15] rollover_max_percentage: (x 10^4), ''
-- ARGV[16] rollover_length: months ('' = 1 for month)
function FNS.grant(keys, args)
  local C = open(keys, args, nil)
  local now = C.now
  local pool, bid, plan = args[3], args[4], args[5]
  local granted = num(args[6])
  local code, count = num(args[7]) or 0, num(args[8]) or 1
  local first, expires = num(args[9]), num(args[10])
  local flags = args[11] or ''
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
  if count_buckets(C) >= MAX_BUCKETS then
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
    pool = pool,
    plan_id = plan ~= '' and plan or nil,
    granted = granted,
    remaining = granted,
    interval = code,
    interval_count = count,
    period = period,
    anchor = 0,
    next_reset_index = nil,
    expires_at = expires,
    unlimited = find(flags, 'u', 1, true) ~= nil,
    overage_allowed = find(flags, 'o', 1, true) ~= nil,
    carry_debt = find(flags, 'd', 1, true) ~= nil,
    overage_floor = num(args[12]),
    rollovers = {},
    rewrite = true,
  }
  if period and first then
    b.anchor, b.next_reset_index = first, 0
  elseif period then
    b.anchor, b.next_reset_index = now, 1
  end
  if args[13] == 'month' then
    b.rollover = { max = num(args[14]), max_percentage = num(args[15]), length = num(args[16]) or 1 }
  elseif args[13] == 'forever' then
    b.rollover = { max = num(args[14]), max_percentage = num(args[15]), length = nil }
  end
  add_pool(C, pool, nil)
  insert_ordered(C.pools[pool], b)
  C.next_seq = seq + 1
  C.led_meta = { op = 'grant' }
  save(C, nil)
  return { bid, now }
end

-- update_bucket (rules::update_bucket): sets a bucket's remaining or adds to it. Reply { 1, now }.
-- ARGV[3] pool: the bucket's pool
-- ARGV[4] balance_id: '' = the pool's first in deduction order
-- ARGV[5] mode: set | add
-- ARGV[6] amount: (x 10^4)
function FNS.update_bucket(keys, args)
  local pool = args[3]
  local C = open(keys, args, { { pool = pool, cost = SCALE } })
  local P = C.pools[pool]
  local target = nil
  if P then
    for _, b in ipairs(P.buckets) do
      if args[4] == '' or b.id == args[4] then
        target = b
        break
      end
    end
  end
  if not target then
    fail('balance_not_found')
  end
  local v = num(args[6])
  local nxt = v
  if args[5] == 'add' then
    nxt = target.remaining + v
  end
  if nxt < -MAX or nxt > MAX then
    fail('amount_out_of_range')
  end
  target.remaining = nxt
  C.led_meta = { op = 'update' }
  save(C, nil)
  return { 1, C.now }
end

-- Whether args from `at` on are pool, cost pairs, at least one.
local function has_pools(args, at)
  local n = #args - at + 1
  if n % 2 ~= 0 then
    fail('invalid_inputs', 'argument pools must be pool, cost pairs')
  end
  return n > 0
end

-- check: the exact dry run of consume (rules::check); writes nothing
-- unless something of the customer was due (then it saves the resets).
-- ARGV[3] feature_id: the feature asked for
-- ARGV[4] units: units asked for (x 10^4)
-- ARGV[5] pools: pool, cost (x 10^6) pairs from here to the end
function FNS.check(keys, args)
  local now = clock(args[1])
  local v = nil
  local units = num(args[4])
  if has_pools(args, 5) then
    local r
    r, v = fast_path(keys, args, now, 'check', '', args[3], units, '', 5)
    if r then
      return r
    end
  end
  local pools = read_pools(args, 5)
  local C = open(keys, args, pools or {}, now, v)
  LIM.setup(C, args[3], pools)
  local o = check_rule(C, pools, units, false)
  local r = outcome_reply(C.now, o, false, args[3], save(C, pools))
  return LIM.with_reply(C, r, o, args[3], pools)
end

-- consume, track, reserve, finalize (rules::apply). `at`: where the pools
-- start (nil: finalize, which uses its lock's).
local function apply_op(keys, args, op, key, feature, units, mode, lock_id, expires_s, at)
  local now = clock(args[1])
  local v = nil
  if (op == 'consume' or (op == 'track' and units >= 0)) and has_pools(args, at) then
    local r
    r, v = fast_path(keys, args, now, op, key, feature, units, mode, at)
    if r then
      return r
    end
  end
  local pools = at and read_pools(args, at)
  local C
  if op == 'finalize' then
    C = open(keys, args, nil, now)
  else
    C = open(keys, args, pools or {}, now, v)
  end
  local now = C.now
  local expires = num(expires_s)
  -- Op::validate: the one rule that needs the clock.
  if op == 'reserve' and expires and expires <= now then
    fail('invalid_inputs', 'expires_at must be in the future')
  end
  -- Op::fingerprint
  local fp
  if op == 'consume' then
    fp = 'consume' .. US .. feature .. US .. fmt(units)
  elseif op == 'track' then
    fp = 'track' .. US .. feature .. US .. fmt(units) .. US .. mode
  elseif op == 'reserve' then
    fp = 'reserve' .. US .. lock_id .. US .. feature .. US .. fmt(units) .. US .. opt(expires)
  elseif op == 'finalize' then
    fp = 'finalize' .. US .. lock_id .. US .. (mode == 'confirm' and '1' or '0') .. US .. opt(units)
  else
    fail('invalid_inputs', 'op unknown operation')
  end
  local o, replayed
  local shown, shown_pools = feature, pools
  local ifield, ifp = nil, nil
  if key ~= '' then
    ifp = digest(fp, IDEM_FP_HEX)
    local rec
    rec, ifield = idem_get(C, key, pools)
    if rec then
      if rec.fp ~= ifp then
        fail('idempotency_key_reused')
      end
      o, replayed = rec.outcome, true
    end
  end
  if op == 'finalize' then
    shown, shown_pools = nil, nil
    local l = get_lock(C, lock_id)
    local r = (not l) and get_receipt(C, lock_id)
    if l or r then
      shown = l and l[LOCK.feature] or r[RECEIPT.feature]
      shown_pools = {}
      for i, p in ipairs(l and l[LOCK.pools] or r[RECEIPT.pools]) do
        shown_pools[i] = { pool = p[1], cost = p[2] }
      end
    end
  end
  LIM.setup(C, shown, shown_pools)
  if not o then
    replayed = false
    if op == 'consume' then
      o = check_rule(C, pools, units, true)
    elseif op == 'track' then
      o = track_rule(C, pools, units, mode)
    elseif op == 'reserve' then
      if get_lock(C, lock_id) then
        fail('lock_already_exists')
      end
      o = check_rule(C, pools, units, true)
      if o.allowed then
        local held = {}
        for i, e in ipairs(o.entries) do
          local b = nil
          for _, x in ipairs(C.pools[e.pool].buckets) do
            if x.id == e.balance_id then
              b = x
              break
            end
          end
          held[i] = { e.balance_id, e.pool, e.kind, e.rollover_expires_at or false, e.amount, e.units, (b and next_reset_at(b)) or false }
        end
        local ps = {}
        for i, p in ipairs(pools) do
          ps[i] = { p.pool, p.cost }
        end
        local lock = { feature, units, expires or false, ps, held }
        if o.holds and o.holds[1] then
          lock[LOCK.limit_held] = o.holds
        end
        set_lock(C, lock_id, lock)
        if expires then
          C.lock_due = opt_min(C.lock_due, expires)
        end
        lock_state(C).receipts[lock_id] = nil
        lock_state(C).receipt_del[lock_id] = true
      end
    else
      local lock = get_lock(C, lock_id)
      C.led_held = lock and lock[LOCK.units]
      if not lock then
        local r = get_receipt(C, lock_id)
        if not r then
          fail('lock_not_found')
        end
        o, replayed = unpack_outcome(r[RECEIPT.outcome]), true
      else
        if mode == 'release' then
          o = release_held(C, lock, now)
          if C.has_limits then
            LIM.release(C, lock[LOCK.limit_held])
          end
        elseif units == nil then
          o = outcome(true, {}, 0)
        else
          local diff = units - lock[LOCK.units]
          if diff < -MAX or diff > MAX then
            fail('amount_out_of_range')
          end
          local owned = owned_pools(C, shown_pools)
          if #owned == 0 then
            o = outcome(diff == 0, {}, diff < 0 and -diff or diff)
          else
            o = track_rule(C, shown_pools, diff, 'cap')
          end
        end
        lock_state(C).receipts[lock_id] = { now + C.ret_lock, lock[LOCK.feature], pack_outcome(o), lock[LOCK.pools] }
        lock_state(C).receipt_del[lock_id] = nil
        set_lock(C, lock_id, nil)
        if lock[LOCK.expires_at] and lock[LOCK.expires_at] == C.lock_due then
          recompute_lock_due(C)
        end
      end
    end
  end
  if C.led and not replayed then
    C.led_meta = LED.meta(op, o, shown, units, key, lock_id, C.led_held)
  end
  local strings = save(C, shown and shown_pools or NONE)
  if ifield and not replayed then
    idem_put(C, ifield, ifp, o, pools)
  end
  local r = outcome_reply(C.now, o, replayed, shown, strings)
  return LIM.with_reply(C, r, o, shown, shown_pools)
end

-- consume (rules::apply of Op::Consume): all of `units` or nothing.
-- ARGV[3] idempotency_key: '' none
-- ARGV[4] feature_id: the feature consumed
-- ARGV[5] units: units (x 10^4), >= 0
-- ARGV[6] pools: pool, cost (x 10^6) pairs from here to the end
function FNS.consume(keys, args)
  return apply_op(keys, args, 'consume', args[3], args[4], num(args[5]), '', '', nil, 6)
end

-- track (Op::Track): records usage; a negative `units` refunds.
-- ARGV[3] idempotency_key: '' none
-- ARGV[4] feature_id: the feature used
-- ARGV[5] units: units (x 10^4), < 0 refunds
-- ARGV[6] behavior: cap | reject | overflow (what happens to what no balance covers)
-- ARGV[7] pools: pool, cost (x 10^6) pairs from here to the end
function FNS.track(keys, args)
  local b = args[6]
  if b ~= 'cap' and b ~= 'reject' and b ~= 'overflow' then
    fail('invalid_inputs', 'argument behavior must be cap, reject or overflow')
  end
  return apply_op(keys, args, 'track', args[3], args[4], num(args[5]), b, '', nil, 7)
end

-- reserve (Op::Reserve): holds `units` under a lock until finalized or expired.
-- ARGV[3] idempotency_key: '' none
-- ARGV[4] feature_id: the feature reserved
-- ARGV[5] units: units (x 10^4), >= 0
-- ARGV[6] lock_id: unique among the customer's pending locks
-- ARGV[7] expires_at: ms, '' never
-- ARGV[8] pools: pool, cost (x 10^6) pairs from here to the end
function FNS.reserve(keys, args)
  return apply_op(keys, args, 'reserve', args[3], args[4], num(args[5]), '', args[6], args[7], 8)
end

-- finalize (Op::Finalize): confirms (optionally with the units used) or releases a lock.
-- ARGV[3] idempotency_key: '' none
-- ARGV[4] lock_id: the pending lock
-- ARGV[5] action: confirm | release
-- ARGV[6] override_units: units used (x 10^4), '' = as reserved
function FNS.finalize(keys, args)
  local a = args[5]
  if a ~= 'confirm' and a ~= 'release' then
    fail('invalid_inputs', 'argument action must be confirm or release')
  end
  return apply_op(keys, args, 'finalize', args[3], '', num(args[6]), a, args[4], nil, nil)
end

-- balances: every pool the customer owns. Reply { created_at, now, pool,
-- pool string, pool, pool string, ... } (storage order). Saves the resets
-- when something was due.
function FNS.balances(keys, args)
  local C = new_customer(keys, args)
  local raw = rcall('HGETALL', C.key)
  local rec = nil
  local out = {}
  for i = 1, #raw, 2 do
    local f = raw[i]
    if f == RECORD_FIELD then
      rec = raw[i + 1]
    elseif f == LIMITS_FIELD then
      C.limits_raw = raw[i + 1]
    elseif sub(f, 1, 1) ~= US then
      out[#out + 1] = f
      out[#out + 1] = raw[i + 1]
    end
  end
  if rec == nil then
    fail('customer_not_found')
  end
  parse_record(C, rec)
  if C.due0 ~= nil and C.due0 <= C.now then
    for i = 1, #raw, 2 do
      if raw[i] ~= RECORD_FIELD and sub(raw[i], 1, 1) ~= US then
        add_pool(C, raw[i], raw[i + 1])
      end
    end
    C.full = true
    prepare(C)
    if C.led then
      C.led_s1 = LED.snap(C)
    end
    local all = {}
    for i, name in ipairs(C.pool_list) do
      all[i] = { pool = name }
    end
    out = save(C, all)
    local live = {}
    for i = 1, #out, 2 do
      if out[i + 1] ~= '' then
        live[#live + 1] = out[i]
        live[#live + 1] = out[i + 1]
      end
    end
    out = live
  end
  local r = { C.created_at, C.now }
  for i, x in ipairs(out) do
    r[2 + i] = x
  end
  if C.has_limits then
    r[#r + 1] = LIMITS_FIELD
    r[#r + 1] = C.limits and LIM.encode(C.limits) or C.limits_raw or ''
  end
  return r
end

-- set_limits: replaces the customer's limits (definitions and counters, as
-- the Rust computed them from the list it read: rules::set_limits) if the
-- stored list is still `expected`; sets or clears the record's flag.
-- Reply { 1 replaced | 0 changed since read (read again), now }.
-- ARGV[3] expected: the stored limits (field \31L) the update was computed from, '' none
-- ARGV[4] limits: the new limits (README § 11), '' none
function FNS.set_limits(keys, args)
  local now = clock(args[1])
  local v = rcall('HMGET', keys[1], RECORD_FIELD, LIMITS_FIELD)
  if not v[1] then
    fail('customer_not_found')
  end
  if (v[2] or '') ~= args[3] then
    return { 0, now }
  end
  local new = args[4] or ''
  -- The ledger (§ 12): the counters the new list drops or resets.
  local _, _, cap = retention(args[2])
  local entry = nil
  if cap then
    local li = LED.limit_items(LED.counters(LIM.decode(v[2] or '')), LIM.decode(new))
    if li[1] then
      LED.guard(keys[2], cap, 1)
      entry = LED.encode(now, keys[1], 'update', nil, 0, NONE, li)
    end
  end
  if new == '' then
    if v[2] then
      rcall('HDEL', keys[1], LIMITS_FIELD)
    end
  elseif new ~= v[2] then
    rcall('HSET', keys[1], LIMITS_FIELD, new)
  end
  local C = new_customer(keys, args, now)
  parse_record(C, v[1])
  if C.has_limits ~= (new ~= '') then
    C.has_limits = new ~= ''
    rcall('HSET', keys[1], RECORD_FIELD, encode_record(C))
  end
  if entry then
    rcall('XADD', LED.stream(keys[2]), '*', 'e', entry)
  end
  return { 1, now }
end

function FNS.reset_due(keys, args)
  local C, resets = open(keys, args, nil)
  save(C, nil)
  return { resets, C.now }
end

-- One customer's reset_due inside reset_due_many (pcall'd there).
local function reset_one(ck, args, now)
  local C, resets = open(ck, args, nil, now)
  save(C, nil)
  return resets
end

-- reset_due_many: KEYS[1] a slot's due index, KEYS[2..] customer hashes of
-- that slot (the sweep's batch); ARGV the header. Each customer is reset as
-- reset_due resets it, one after the other at one instant; a customer that
-- is gone has its index entry removed. The sweep picks how many customers
-- one call may do (src/engine/redis/sweep.rs: SWEEP_BATCH), which bounds
-- how long the call holds the server. Reply { resets applied, customers
-- gone, now }.
function FNS.reset_due_many(keys, args)
  local now = clock(args[1])
  local due = keys[1]
  local ck = { '', due }
  local resets, gone = 0, 0
  for i = 2, #keys do
    ck[1] = keys[i]
    local ok, res = pcall(reset_one, ck, args, now)
    if ok then
      resets = resets + res
    elseif type(res) == 'table' and res.cg == 'customer_not_found' then
      rcall('ZREM', due, tag_of(keys[i]))
      gone = gone + 1
    else
      error(res)
    end
  end
  return { resets, gone, now }
end

---------------------------------------------------------------------------
-- Helpers that were inline scripts in the Rust (src/store/mod.rs, lock_index.rs).
---------------------------------------------------------------------------
-- lease: KEYS[1] lease key; ARGV[1] holder id, ARGV[2] lease ms. Takes the
-- lease when free or renews it when ours. Reply 1 taken/renewed, 0 held elsewhere.
function FNS.lease(keys, args)
  local v = rcall('GET', keys[1])
  if v == false or v == args[1] then
    rcall('SET', keys[1], args[1], 'PX', args[2])
    return 1
  end
  return 0
end

-- release: KEYS[1] lease key; ARGV[1] holder id. Reply 1 released, 0 not ours.
function FNS.release(keys, args)
  if rcall('GET', keys[1]) == args[1] then
    return rcall('DEL', keys[1])
  end
  return 0
end

-- claim: KEYS[1] lock-index key cg2:lock:{<escaped lock id>}; ARGV[1] customer
-- id, ARGV[2] keep until (ms), ARGV[3] now ('' = TIME). Refuses when another
-- customer's entry is live, else writes ours (never shortening our own).
-- Reply { 1 claimed | 0 refused, now }.
function FNS.claim(keys, args)
  local now = clock(args[3])
  local keep = tonumber(args[2])
  local v = rcall('GET', keys[1])
  if v then
    local sep = find(v, US, 1, true)
    local holder, until_s = sub(v, 1, sep - 1), sub(v, sep + 1)
    local until_ms = tonumber(until_s)
    local live = until_ms == nil or until_ms > now
    if holder ~= args[1] and live then
      return { 0, now }
    end
    if holder == args[1] then
      if until_ms == nil then
        return { 1, now }
      end
      if until_ms > keep then
        keep = until_ms
      end
    end
  end
  rcall('SET', keys[1], args[1] .. US .. fmt(keep), 'PX', max(keep - now, 1))
  return { 1, now }
end

---------------------------------------------------------------------------
-- migrate: one cg1 customer into cg2 (the cg1 storage format of lua/lib.lua).
-- KEYS [1] cg1:{t} [2] cg1:due:{s} [3] cg2:{t} [4] cg2:due:{s}
--      (the lock hashes are <key>:l)
-- ARGV [1] now ('' = TIME) [2] retention (as every function) [3] the
--      customer id (the cg1 due index's member)
-- Reply { 1 migrated | 0 no cg1 customer, now }. Error `layout_conflict`
-- when the customer exists in both layouts. Records and receipts are
-- separate keys: migrate_key converts them one at a time.
---------------------------------------------------------------------------
local function cg1_decode_bucket(id, s, rows)
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
    interval = code,
    interval_count = count,
    period = make_period(code, count),
    anchor = d36(f[7]) or 0,
    next_reset_index = d36(f[8]),
    expires_at = d36(f[9]),
    unlimited = find(flags, 'u', 1, true) ~= nil,
    overage_allowed = find(flags, 'o', 1, true) ~= nil,
    carry_debt = find(flags, 'd', 1, true) ~= nil,
    overage_floor = d36(f[11]),
    plan_id = (f[13] ~= nil and f[13] ~= '') and f[13] or nil,
    rollovers = {},
    rewrite = true,
  }
  if rows and rows ~= '' then
    for i, r in ipairs(split(rows, RS)) do
      local x = split(r, ',')
      b.rollovers[i] = { expires_at = d36(x[1]), granted = d36(x[2]), balance = d36(x[3]) }
    end
  end
  if f[12] ~= nil and f[12] ~= '' then
    local r = split(f[12], '/')
    b.rollover = { max = d36(r[1]), max_percentage = d36(r[2]), length = d36(r[3]) }
  end
  return b
end

function FNS.migrate(keys, args)
  local now = clock(args[1])
  local raw = rcall('HGETALL', keys[1])
  if #raw == 0 then
    return { 0, now }
  end
  if rcall('EXISTS', keys[3]) == 1 then
    fail('layout_conflict', 'customer exists in cg1 and cg2')
  end
  local fields = {}
  for i = 1, #raw, 2 do
    fields[raw[i]] = raw[i + 1]
  end
  local rec = fields['\31']
  if rec == nil then
    fail('customer_not_found')
  end
  local r = split(rec, US)
  local C = new_customer({ keys[3], keys[4] }, args, now)
  C.created_at, C.next_seq, C.lock_due = d36(r[1]), d36(r[2]), d36(r[3])
  C.rec, C.due0, C.full = nil, nil, true
  local buckets = {}
  for f, v in pairs(fields) do
    if f ~= '\31' and find(f, US, 1, true) == nil then
      buckets[#buckets + 1] = cg1_decode_bucket(f, v, fields[f .. '\31r'])
    end
  end
  -- rules::bucket_order_key (pool index aside): each pool's order, ties by seq.
  sort(buckets, function(a, b)
    if a.pool ~= b.pool then
      return a.pool < b.pool
    end
    local an, bn_ = a.period == nil and 1 or 0, b.period == nil and 1 or 0
    if an ~= bn_ then
      return an < bn_
    end
    local ap, bp = a.period and nominal_ms(a.period) or 0, b.period and nominal_ms(b.period) or 0
    if ap ~= bp then
      return ap < bp
    end
    local ae, be = a.expires_at or INF, b.expires_at or INF
    if ae ~= be then
      return ae < be
    end
    return a.seq < b.seq
  end)
  for _, b in ipairs(buckets) do
    add_pool(C, b.pool, nil)
    local P = C.pools[b.pool]
    P.buckets[#P.buckets + 1] = b
  end
  save(C, nil)
  if rcall('EXISTS', keys[1] .. ':l') == 1 then
    rcall('RENAME', keys[1] .. ':l', keys[3] .. ':l')
  end
  rcall('DEL', keys[1])
  rcall('ZREM', keys[2], args[3])
  return { 1, now }
end

-- migrate_key: one cg1 record key into cg2.
-- KEYS [1] the cg1 key: cg1:{t}:i:<idempotency key> or cg1:{t}:f:<lock id>
--      [2] the cg2 customer hash cg2:{t}  [3] the cg2 due index cg2:due:{s}
-- ARGV [1] now ('' = TIME) [2] retention (as every function) [3] the
--      idempotency key or lock id (the key's tail) [4] kind: 'i' record |
--      'f' receipt [5..] for 'i': the record's pools, pool, cost pairs
--      (those of its feature), so its entries can name them by position
-- Reply { 1 moved | 0 gone, now }.
function FNS.migrate_key(keys, args)
  local now = clock(args[1])
  local v = rcall('GET', keys[1])
  if not v then
    return { 0, now }
  end
  local C = new_customer({ keys[2], keys[3] }, args, now)
  if args[4] == 'f' then
    local ttl = rcall('PTTL', keys[1])
    rcall('SET', receipt_key(C, args[3]), v, 'PX', max(ttl, 1))
    rcall('DEL', keys[1])
    return { 1, now }
  end
  local rec = mp_unpack(v) -- { fingerprint, expires_at, packed outcome }
  local expires_at = rec[2]
  if expires_at > now then
    local pools = read_pools(args, 5) or {}
    local w = max(C.ret_idem, 1)
    -- The window of a record written at expires_at - retention.
    local start = floor((expires_at - C.ret_idem) / w) * w
    local k = keys[3] .. ':i:' .. e36(start)
    local o = unpack_outcome(rec[3])
    rcall('HSET', k, digest(C.member .. US .. args[3], IDEM_KEY_HEX), digest(rec[1], IDEM_FP_HEX) .. idem_encode(o, expires_at - start, pools))
    rcall('PEXPIRE', k, max(1, start + 2 * w - now), 'NX')
  end
  rcall('DEL', keys[1])
  return { 1, now }
end

-- delete_customer: removes the customer: its hash (record, pools, limits),
-- its pending locks and its due-index entry, after its lazy steps (their
-- entries first). With the ledger on, a delete_customer entry gives back
-- every balance's total and every counter, so the customer's ledger
-- replays to zero. Finalized locks' receipts and idempotency records are
-- left to expire with their retention (they live in keys shared with other
-- customers, or under names only the lock ids know). Reply { 1, now }.
function FNS.delete_customer(keys, args)
  local C = open(keys, args, nil)
  LIM.load(C)
  if C.led then
    for _, name in ipairs(C.pool_list) do
      C.pools[name].buckets = {}
    end
    C.limits = {}
    LED.queue(C, C.led_s1, { op = 'delete_customer', always = true })
    LED.guard(C.due_key, C.led_cap, #C.led) -- before the first write
  end
  rcall('DEL', C.key, C.lock_key)
  rcall('ZREM', C.due_key, C.member)
  LED.flush(C)
  return { 1, C.now }
end

-- delete_balance: removes one bucket, after the lazy steps; refuses one used
-- this period (granted ~= remaining, or a rollover row drawn on) unless
-- forced. With the ledger on, a delete_balance entry gives back its total.
-- Reply { balance id, now }.
-- ARGV[3] pool: '' = any
-- ARGV[4] balance_id: '' = any
-- ARGV[5] interval code: '' = any
-- ARGV[6] force: '1' = even when used
function FNS.delete_balance(keys, args)
  local C = open(keys, args, nil)
  local interval = args[5] ~= '' and tonumber(args[5]) or nil
  local hit, hit_pool, hit_at = nil, nil, nil
  for _, name in ipairs(C.pool_list) do
    if args[3] == '' or args[3] == name then
      for i, b in ipairs(C.pools[name].buckets) do
        if (args[4] == '' or b.id == args[4]) and (interval == nil or b.interval == interval) then
          if hit then
            fail('invalid_inputs', 'balance_id several balances of this feature match; name the one to delete by balance_id')
          end
          hit, hit_pool, hit_at = b, name, i
        end
      end
    end
  end
  if not hit then
    fail('balance_not_found')
  end
  local used = hit.granted ~= hit.remaining
  for _, r in ipairs(hit.rollovers) do
    used = used or r.granted ~= r.balance
  end
  if used and args[6] ~= '1' then
    fail('balance_in_use', hit.id)
  end
  table.remove(C.pools[hit_pool].buckets, hit_at)
  C.led_meta = { op = 'delete_balance', always = true }
  save(C, nil)
  return { hit.id, C.now }
end

---------------------------------------------------------------------------
-- Registration.
---------------------------------------------------------------------------
local function register(name, f, flags)
  redis.register_function({
    function_name = FN .. name,
    callback = function(keys, args)
      return run(f, keys, args)
    end,
    flags = flags,
  })
end

register('create_customer', FNS.create_customer)
register('grant', FNS.grant)
register('update_bucket', FNS.update_bucket)
register('check', FNS.check)
register('consume', FNS.consume)
register('track', FNS.track)
register('reserve', FNS.reserve)
register('finalize', FNS.finalize)
register('balances', FNS.balances)
register('reset_due', FNS.reset_due)
register('reset_due_many', FNS.reset_due_many)
register('lease', FNS.lease)
register('release', FNS.release)
register('claim', FNS.claim)
register('migrate', FNS.migrate)
register('migrate_key', FNS.migrate_key)
register('set_limits', FNS.set_limits)
register('delete_customer', FNS.delete_customer)
register('delete_balance', FNS.delete_balance)
