-- Turn an account's auto-recharge on (with its threshold) or off, in its real-time state.
--
-- KEYS[1] account hash   KEYS[2] outbox list
-- ARGV[1] mode   "on" (ARGV[2] threshold, micro-units) | "off" | "close" (ARGV[2] trigger seq)
--
-- on/off drop any open trigger ("rq"): new settings start a new crossing. Turned on with the
-- available credit already at or below the threshold, the trigger fires at once (an admin
-- turning auto-recharge on for a low account expects it to be recharged now).
-- close: the recharge worker is done with trigger ARGV[2] (recharged, refused for good,
-- cancelled); the next event at or below the threshold fires a new one.
-- Reply: {found, n}: found 0 for an unknown account; n = the seq of the trigger fired ("on"),
-- or 1 if the trigger was closed ("close"), else 0.

--#include lib/recharge.lua

local f = redis.call('HMGET', KEYS[1], 'bal', 'res', 'cl', 'rq')
if not f[1] then
  return {0, 0}
end
if ARGV[1] == 'close' then
  if f[4] == ARGV[2] then
    redis.call('HDEL', KEYS[1], 'rq')
    return {1, 1}
  end
  return {1, 0}
end
redis.call('HDEL', KEYS[1], 'rq')
if ARGV[1] == 'off' then
  redis.call('HDEL', KEYS[1], 'rth')
  return {1, 0}
end
redis.call('HSET', KEYS[1], 'rth', ARGV[2])
local avail = tonumber(f[1]) + tonumber(f[3] or '0') - tonumber(f[2] or '0')
return {1, recharge_trigger(KEYS[1], KEYS[2], avail, ARGV[2], nil) or 0}
