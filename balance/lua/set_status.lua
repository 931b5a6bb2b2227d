-- Suspend, pin on hold or resume an account (enforcement.account_admin decides which, from the
-- origins of its suspension in PostgreSQL; the recharge cap pins a hold).
--
-- KEYS[1] account hash   KEYS[2] outbox list
-- ARGV[1] action "suspend" | "hold" | "resume"   ARGV[2] reason (short code, e.g. "operator")
-- ARGV[3] now    unix seconds of the caller's clock (never Redis's own): which grants of the
--                minute bucket are usable now, for where a resumed account's credit puts it
-- ARGV[4] lift   "1": a resume lifts a pinned hold too (only an operator's may), "0": it
--                leaves it; "0" for the other actions
--
-- "hold" pins the account on hold whatever its credit (field "hr" = reason, e.g.
-- recharge_cap): no new outbound calls until an operator resumes it or a payment lifts it.
-- Reply: {changed, status}: changed = 1 when a signal was queued (or a pin set or lifted), 0
-- when already so, -1 for an unknown account. Resuming lifts the suspension (the caller resumes
-- only once no origin of it is left) and, with lift, the pin; an account still pinned goes to
-- hold, any other where its credit says (active, low or hold). Leaving a suspension queues
-- account.resume, then account.hold when the account lands on hold (the pin's reason, or
-- credit_exhausted): a consumer that applies the latest signal and one that tracks suspend
-- and hold apart both end up holding outbound calls only.

--#include lib/state.lua
--#include lib/bucket.lua
--#include lib/outbox.lua

local action, reason, now, lift = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
if action ~= 'suspend' and action ~= 'hold' and action ~= 'resume' then
  return redis.error_reply('ERR set_status: unknown action')
end
if not reason or #reason > 64 or not string.match(reason, '^[a-z0-9_]+$') then
  -- it ends up in '|'-separated outbox entries
  return redis.error_reply('ERR set_status: reason must be a short code')
end
if not now or now ~= math.floor(now) then
  return redis.error_reply('ERR set_status: now must be whole unix seconds')
end
if lift ~= '0' and lift ~= '1' or (lift == '1' and action ~= 'resume') then
  return redis.error_reply('ERR set_status: lift must be "0", or "1" for a resume')
end
local f = redis.call('HMGET', KEYS[1], 'bal', 'res', 'cl', 'lowth', 'st', 'hr', 'min')
if not f[1] then
  return {-1, ''}
end
local st = f[5] or 'active'
local function queue(signal)
  queue_signal(KEYS[1], KEYS[2], signal)
end
if action == 'suspend' then
  if st == 'suspended' then
    return {0, st}
  end
  redis.call('HSET', KEYS[1], 'st', 'suspended')
  queue('account.suspend|' .. reason)
  return {1, 'suspended'}
end
if action == 'hold' then
  if f[6] then
    return {0, st}
  end
  redis.call('HSET', KEYS[1], 'hr', reason)
  if st == 'suspended' or st == 'hold' then
    return {1, st} -- pinned all the same: lifting the suspension leaves it held
  end
  redis.call('HSET', KEYS[1], 'st', 'hold')
  queue('account.hold|' .. reason)
  return {1, 'hold'}
end
local pin = f[6]
local unpinned = pin and lift == '1'
if st ~= 'suspended' and not unpinned then
  return {0, st}
end
if unpinned then
  redis.call('HDEL', KEYS[1], 'hr')
  pin = nil
end
local new_st
if pin then
  new_st = 'hold' -- a suspension lifted from under a pin: held for the pin's reason
else
  local avail = tonumber(f[1]) + tonumber(f[3] or '0') - tonumber(f[2] or '0')
  new_st = transition('active', avail, tonumber(f[4] or '0'), nil, usable_seconds(f[7], now))
end
redis.call('HSET', KEYS[1], 'st', new_st)
if st == 'hold' and new_st == 'hold' then
  return {1, new_st} -- still no credit: the hold telephony has stands, for another reason
end
queue('account.resume|' .. reason)
if new_st == 'hold' then
  queue('account.hold|' .. (pin or 'credit_exhausted'))
end
return {1, new_st}
