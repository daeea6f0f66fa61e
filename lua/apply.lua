-- apply: consume, track, reserve or finalize, with an optional idempotency key.
-- KEYS[1] customer hash cg1:{t}   KEYS[2] lock hash cg1:{t}:l   KEYS[3] due index cg1:due:{<slot tag>}
-- ARGV[1] now: ms UTC ('' = Redis TIME)
-- ARGV[2] idempotency_retention_ms: how long an idempotency record is kept
-- ARGV[3] lock_retention_ms: how long a finalized lock is remembered
-- ARGV[4] customer_id: the member of the due index
-- ARGV[5] op: consume | track | reserve | finalize
-- ARGV[6] idempotency_key: '' = none; the record is the key cg1:{t}:i:<key>
-- ARGV[7] feature_id: finalize: ''
-- ARGV[8] units: raw, x10^4; track: negative refunds; finalize: override value or ''
-- ARGV[9] mode: track: cap | reject | overflow; finalize: confirm | release; else ''
-- ARGV[10] lock_id: reserve, finalize; else ''
-- ARGV[11] expires_at: reserve: the lock's expiry ('' = never)
-- ARGV[12] pool_count: N (-1 = unknown feature; finalize: 0, the lock keeps its own)
-- ARGV[13..] pools: N pairs: pool id, cost (raw, x10^6), in deduction order
-- Reply: an outcome (see lua/README.md). track with reject answers flag 'i'
-- rather than an error, so a replayed refusal can be told apart.
-- Trusts: ids valid, units >= 0 for consume/reserve, override >= 0.
return run_main(function()
  local C = open_customer()
  local now = C.now
  local op, key = ARGV[5], ARGV[6]
  local feature, units, mode = ARGV[7], num(ARGV[8]), ARGV[9]
  local lock_id, expires = ARGV[10], num(ARGV[11])
  local pools = read_pools(ARGV, 12)
  prepare(C)
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
  local ikey = nil
  if key ~= '' then
    ikey = C.key .. ':i:' .. key
    local v = redis.call('GET', ikey)
    if v then
      local rec = cmsgpack.unpack(v)
      if rec[RECORD.EXPIRES_AT] > now then
        if rec[RECORD.FINGERPRINT] ~= fp then
          fail('idempotency_key_reused')
        end
        o, replayed = unpack_outcome(rec[RECORD.OUTCOME]), true
      end
    end
  end
  if op == 'finalize' then
    shown, shown_pools = nil, nil
    local l = get_lock(C, lock_id)
    local r = (not l) and get_receipt(C, lock_id)
    local src = l or r
    if src then
      shown = l and l[LOCK.FEATURE] or r[RECEIPT.FEATURE]
      shown_pools = {}
      -- A lock and its receipt keep their pools at the same position.
      for i, p in ipairs(src[LOCK.POOLS]) do
        shown_pools[i] = { pool = p[POOL.ID], cost = p[POOL.COST] }
      end
    end
  end
  if not o then
    replayed = false
    if op == 'consume' then
      o = check(C, pools, units, true)
    elseif op == 'track' then
      o = track(C, pools, units, mode)
    elseif op == 'reserve' then
      if get_lock(C, lock_id) then
        fail('lock_already_exists')
      end
      o = check(C, pools, units, true)
      if o.allowed then
        local held = {}
        for i, e in ipairs(o.entries) do
          local b = find_bucket(C, e.bid)
          held[i] = { e.bid, e.pool, e.kind, e.exp or false, e.amount, e.units, (b and next_reset_at(b)) or false }
        end
        local ps = {}
        for i, p in ipairs(pools) do
          ps[i] = { p.pool, p.cost }
        end
        set_lock(C, lock_id, { feature, units, expires or false, ps, held })
        if expires then
          C.le = opt_min(C.le, expires)
        end
        C.receipts[lock_id] = nil
        C.receipt_del[lock_id] = true
      end
    else
      local lock = get_lock(C, lock_id)
      if not lock then
        local r = get_receipt(C, lock_id)
        if not r then
          fail('lock_not_found')
        end
        o, replayed = unpack_outcome(r[RECEIPT.OUTCOME]), true
      else
        if mode == 'release' then
          o = release_held(C, lock, now)
        elseif units == nil then
          o = outcome(true, {}, 0)
        else
          local diff = units - lock[LOCK.UNITS]
          if diff < -MAX or diff > MAX then
            fail('amount_out_of_range')
          end
          local owned = owned_pools(C.buckets, shown_pools)
          if #owned == 0 then
            o = outcome(diff == 0, {}, diff < 0 and -diff or diff)
          else
            o = track(C, shown_pools, diff, 'cap')
          end
        end
        C.receipts[lock_id] = { now + C.ret_lock, lock[LOCK.FEATURE], pack_outcome(o), lock[LOCK.POOLS] }
        C.receipt_del[lock_id] = nil
        set_lock(C, lock_id, nil)
        if lock[LOCK.EXPIRES_AT] and lock[LOCK.EXPIRES_AT] == C.le then
          recompute_le(C)
        end
      end
    end
  end
  save(C)
  if ikey and not replayed then
    redis.call('SET', ikey, cmsgpack.pack({ fp, now + C.ret_idem, pack_outcome(o) }), 'PX', max(1, C.ret_idem))
  end
  local buckets = {}
  if shown then
    buckets = views(C, shown_pools)
  end
  return outcome_reply(o, replayed, shown, buckets)
end)
