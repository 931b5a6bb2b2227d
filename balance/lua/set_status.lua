-- An operator suspends or resumes an account (later also the past-due rules).
--
-- KEYS[1] account hash   KEYS[2] outbox list
-- ARGV[1] action "suspend" | "hold" | "resume"   ARGV[2] reason (short code, e.g. "operator")
-- ARGV[3] now    unix seconds of the caller's clock (never Redis's own): which grants of the
--                minute bucket are usable now, for where a resumed account's credit puts it
--
-- "hold" pins the account on hold whatever its credit (field "hr" = reason, e.g.
-- recharge_cap): no new outbound calls until an operator resumes it or a payment lifts it.
-- Reply: {changed, status}: changed = 1 when a signal was queued (or a pin set), 0 when already
-- so, -1 for an unknown account. Resuming lifts a suspension and a pinned hold, puts the account
-- where its credit says (active, low or hold), and queues account.resume (then account.hold too
-- when its credit is exhausted).

--#include lib/state.lua
--#include lib/bucket.lua
--#include lib/outbox.lua

local now = tonumber(ARGV[3])
local f = redis.call('HMGET', KEYS[1], 'bal', 'res', 'cl', 'lowth', 'st', 'hr', 'min')
if not f[1] then
  return {-1, ''}
end
local st = f[5] or 'active'
local function queue(signal)
  queue_signal(KEYS[1], KEYS[2], signal)
end
if ARGV[1] == 'suspend' then
  if st == 'suspended' then
    return {0, st}
  end
  redis.call('HSET', KEYS[1], 'st', 'suspended')
  queue('account.suspend|' .. ARGV[2])
  return {1, 'suspended'}
end
if ARGV[1] == 'hold' then
  if f[6] then
    return {0, st}
  end
  redis.call('HSET', KEYS[1], 'hr', ARGV[2])
  if st == 'suspended' or st == 'hold' then
    return {1, st} -- pinned all the same: lifting the suspension leaves it held
  end
  redis.call('HSET', KEYS[1], 'st', 'hold')
  queue('account.hold|' .. ARGV[2])
  return {1, 'hold'}
end
if st ~= 'suspended' and not f[6] then
  return {0, st}
end
redis.call('HDEL', KEYS[1], 'hr')
local avail = tonumber(f[1]) + tonumber(f[3] or '0') - tonumber(f[2] or '0')
local new_st = transition('active', avail, tonumber(f[4] or '0'), nil, usable_seconds(f[7], now))
redis.call('HSET', KEYS[1], 'st', new_st)
if st == 'hold' and new_st == 'hold' then
  return {1, new_st} -- still no credit: the hold telephony has stands, for another reason
end
queue('account.resume|' .. ARGV[2])
if new_st == 'hold' then
  queue('account.hold|credit_exhausted')
end
return {1, new_st}
