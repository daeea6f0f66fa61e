-- lock_claim: claims a lock id across customers before a reserve.
-- KEYS[1] the lock-id index cg1:lock:{<escaped lock id>}
-- ARGV[1] customer_id: the claimant
-- ARGV[2] keep_until: ms
-- ARGV[3] now: ms
-- The value is <customer id>\31<keep until ms>; '' keep-until means "until a
-- later record sets a time" (a pending lock without expiry).
-- Reply: 1 claimed (or already ours; never shortened), 0 another customer's
-- entry is live (nothing changes).
-- Not prepended with lib.lua: it touches the index key alone (cluster-safe).
local v = redis.call('GET', KEYS[1])
local now, keep = tonumber(ARGV[3]), tonumber(ARGV[2])
if v then
  local sep = string.find(v, '\31', 1, true)
  local holder, until_s = string.sub(v, 1, sep - 1), string.sub(v, sep + 1)
  local until_ms = tonumber(until_s)
  local live = until_ms == nil or until_ms > now
  if holder ~= ARGV[1] and live then
    return 0
  end
  if holder == ARGV[1] then
    if until_ms == nil then
      return 1
    end
    if until_ms > keep then
      keep = until_ms
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. '\31' .. string.format('%d', keep), 'PX', math.max(keep - now, 1))
return 1
