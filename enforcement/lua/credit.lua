-- Credit an account once per credit id (payment capture, adjustment, compensation).
--
-- KEYS[1] account hash   KEYS[2] applied-credits hash   KEYS[3] outbox list
-- ARGV[1] credit_id      unique id of this credit; a second call with it changes nothing
-- ARGV[2] amount         micro-units (> 0 credits, < 0 is a correcting debit)
--
-- Reply: {applied, balance, status}; applied = 0 for a repeat, -1 for an unknown account.
-- An account on hold whose available credit is positive again goes back to active and an
-- account.resume signal is queued in its outbox.
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

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {-1, 0, ''}
end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then
  local f = redis.call('HMGET', KEYS[1], 'bal', 'st')
  return {0, tonumber(f[1] or '0'), f[2] or 'active'}
end
local bal = tonumber(redis.call('HINCRBY', KEYS[1], 'bal', ARGV[2]))
local f = redis.call('HMGET', KEYS[1], 'res', 'cl', 'lowth', 'st')
local avail = bal + tonumber(f[2] or '0') - tonumber(f[1] or '0')
local st, signal = transition(f[4] or 'active', avail, tonumber(f[3] or '0'))
if st ~= f[4] then
  redis.call('HSET', KEYS[1], 'st', st)
end
if signal then
  local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  redis.call('RPUSH', KEYS[3], seq .. '|' .. signal)
end
return {1, bal, st}
