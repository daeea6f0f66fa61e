-- create_customer: creates a customer record if absent.
-- KEYS[1] customer hash  cg1:{<escaped customer id>}
-- ARGV[1] now: ms UTC ('' = Redis TIME)
-- Reply: 1 created, 0 already existed (nothing changed).
return run_main(function()
  local now = now_arg(ARGV[1])
  return redis.call('HSETNX', KEYS[1], CUSTOMER_FIELD, e36(now) .. US .. '1')
end)
