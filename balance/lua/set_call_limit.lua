-- Set an account's concurrent-call limit (its plan's max_concurrent_calls; the subscription
-- changed plan): the most live calls it may have at once, inbound and outbound.
--
-- KEYS[1] account hash   KEYS[2] reservations hash
-- ARGV[1] max_calls      a whole number: "0" for no limit (the "mc" field is removed)
--
-- Calls live already stay up, however many they are: the limit bars new calls only (reserve.lua).
-- The live calls are counted from the reservations themselves here and the count ("lc") set
-- from them (lib/calls.lua): a change of plan is rare, and the count is checked against the
-- calls at each one.
-- Reply: the account's live calls now, or -1 for an unknown account.

--#include lib/calls.lua

local max_calls = ARGV[1]
if not max_calls or #max_calls > 9 or not string.match(max_calls, '^%d+$') then
  return redis.error_reply('ERR set_call_limit: max_calls must be a whole number >= 0')
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local n = tonumber(max_calls)
if n > 0 then
  redis.call('HSET', KEYS[1], 'mc', string.format('%d', n))
else
  redis.call('HDEL', KEYS[1], 'mc')
end
local live = count_live(KEYS[2])
redis.call('HSET', KEYS[1], 'lc', string.format('%d', live))
return live
