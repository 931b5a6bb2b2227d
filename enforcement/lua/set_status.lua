-- An operator suspends or resumes an account (later also the past-due rules).
--
-- KEYS[1] account hash   KEYS[2] outbox list
-- ARGV[1] action "suspend" | "resume"   ARGV[2] reason (short code, e.g. "operator")
--
-- Reply: {changed, status}: changed = 1 when a signal was queued, 0 when already so, -1 for an
-- unknown account. Resuming puts the account where its credit says (active, low or hold), and
-- queues account.resume (then account.hold too when its credit is exhausted).
-- The account state machine, shared by every script that moves money (keep the copies equal;
-- tests/test_balance.py checks they are). Returns the new status and the signal to queue, if any.
local function transition(st, avail, lowth)
  if st == 'suspended' then
    return st, nil
  end
  local target = 'active'
  if avail <= 0 then
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

local f = redis.call('HMGET', KEYS[1], 'bal', 'res', 'cl', 'lowth', 'st')
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
if st ~= 'suspended' then
  return {0, st}
end
local avail = tonumber(f[1]) + tonumber(f[3] or '0') - tonumber(f[2] or '0')
local new_st = transition('active', avail, tonumber(f[4] or '0'))
redis.call('HSET', KEYS[1], 'st', new_st)
queue('account.resume|' .. ARGV[2])
if new_st == 'hold' then
  queue('account.hold|credit_exhausted')
end
return {1, new_st}
