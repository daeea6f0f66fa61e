-- lease_release: gives a sweep shard's lease back if this sweeper still holds it.
-- KEYS[1] the lease cg1:sweep:<shard>
-- ARGV[1] sweeper_id: the sweeper giving it back
-- Reply: 1 released, 0 not ours (lapsed or taken over).
-- Not prepended with lib.lua: it touches the lease key alone (cluster-safe).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
