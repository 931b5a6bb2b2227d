-- An operator changes an account's credit limit or low-balance threshold.
--
-- KEYS[1] account hash   KEYS[2] outbox list
-- ARGV[1] credit_limit   ARGV[2] low_threshold   (micro-units, >= 0, checked by the caller)
-- ARGV[3] now            unix seconds of the caller's clock: which minute-bucket grants count
--
-- The available credit moves with the limit, so the account moves where its credit now says,
-- through the same state machine as a debit or a credit (a raised limit lifts a hold on money
-- alone and queues account.resume; a lowered one can hold the account). A suspension or a
-- pinned hold is left as it is.
-- Reply: {1, status}, or {-1, ''} for an unknown account.

--#include lib/state.lua
--#include lib/bucket.lua
--#include lib/outbox.lua

local f = redis.call('HMGET', KEYS[1], 'bal', 'res', 'st', 'hr', 'min')
if not f[1] then
  return {-1, ''}
end
redis.call('HSET', KEYS[1], 'cl', ARGV[1], 'lowth', ARGV[2])
local avail = tonumber(f[1]) + tonumber(ARGV[1]) - tonumber(f[2] or '0')
local st, signal = transition(f[3] or 'active', avail, tonumber(ARGV[2]), f[4],
  usable_seconds(f[5], tonumber(ARGV[3])))
if st ~= f[3] then
  redis.call('HSET', KEYS[1], 'st', st)
end
if signal then
  queue_signal(KEYS[1], KEYS[2], signal)
end
return {1, st}
