-- lease_take: takes a sweep shard's lease, or renews it if this sweeper holds it.
-- KEYS[1] the lease cg1:sweep:<shard>
-- ARGV[1] sweeper_id: the sweeper asking
-- ARGV[2] lease_ms: the lease's lifetime
-- Reply: 1 taken or renewed, 0 another sweeper holds it.
-- Not prepended with lib.lua: it touches the lease key alone (cluster-safe).
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
