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
-- The account state machine, shared by every script that moves money (keep the copies equal;
-- tests/test_balance.py checks they are). Returns the new status and the signal to queue, if any.
-- pinned: the account is held for a reason its credit does not explain ("hr", e.g.
-- recharge_cap): only an operator's resume or a payment lifts it. secs: usable_seconds().
local function transition(st, avail, lowth, pinned, secs)
  if st == 'suspended' or pinned then
    return st, nil
  end
  local target = 'active'
  if avail <= 0 and secs <= 0 then
    target = 'hold'
  elseif avail <= lowth then
    target = 'low'
  end
  if target == st then
    return st, nil
  elseif target == 'hold' then
    return target, 'account.hold|credit_exhausted'
  elseif st == 'hold' then
    return target, 'account.resume|credit_available'
  elseif target == 'low' then
    return target, 'account.low_balance|below_threshold'
  end
  return target, nil
end

-- Seconds the minute bucket can still give a call answered at ``now`` (grants valid then),
-- shared by the scripts that decide the account's state (keep the copies equal;
-- tests/test_balance.py checks they are): money exhausted with minutes left is low, not hold.
local function usable_seconds(bucket, now)
  local s = 0
  for rem, from, to in string.gmatch(bucket or '', '[^,;]+,(%d+),(%d+),(%d+)') do
    if tonumber(from) <= now and now < tonumber(to) then
      s = s + tonumber(rem)
    end
  end
  return s
end

local now = tonumber(ARGV[3])
local f = redis.call('HMGET', KEYS[1], 'bal', 'res', 'cl', 'lowth', 'st', 'hr', 'min')
if not f[1] then
  return {-1, ''}
end
local st = f[5] or 'active'
local function queue(signal)
  local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  redis.call('RPUSH', KEYS[2], seq .. '|' .. signal)
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
