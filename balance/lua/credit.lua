-- Credit an account once per credit id (payment capture, adjustment, compensation).
--
-- KEYS[1] account hash   KEYS[2] applied-credits hash   KEYS[3] outbox list
-- ARGV[1] credit_id      unique id of this credit; a second call with it changes nothing
-- ARGV[2] amount         micro-units (> 0 credits, < 0 is a correcting debit)
-- ARGV[3] payment        "1" when the credit is a payment: it lifts a hold the service pinned
--                        (hr, e.g. recharge_cap), as a customer paying expects service back
-- ARGV[4] now            unix seconds of the caller's clock (never Redis's own): which grants
--                        of the minute bucket are usable now, for the state machine
--
-- Reply: {applied, balance, status}; applied = 0 for a repeat, -1 for an unknown account.
-- An account on hold whose available credit is positive again goes back to active and an
-- account.resume signal is queued in its outbox. An open auto-recharge trigger ("rq") is
-- closed once the available credit is above the threshold again, re-arming the next crossing.
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

-- The auto-recharge trigger, shared by the scripts that move money (keep the copies equal;
-- tests/test_balance.py checks they are). Edge-triggered: it fires when available credit is at
-- or below the threshold ("rth", present only while auto-recharge is on) and no trigger is open
-- ("rq"); "rq" stays set until the available credit is seen above the threshold again or the
-- recharge worker closes the trigger, so all the events of one crossing fire it once. The
-- request travels in the outbox like a signal (metering/processor.py routes it to its own
-- topic). Returns its seq.
local function recharge_trigger(acct, avail, rth, rq)
  if not rth then
    return nil
  end
  if avail > tonumber(rth) then
    if rq then
      redis.call('HDEL', acct, 'rq')
    end
    return nil
  end
  if rq then
    return nil
  end
  local seq = redis.call('HINCRBY', acct, 'seq', 1)
  redis.call('HSET', acct, 'rq', seq)
  redis.call('RPUSH', acct .. ':out', seq .. '|recharge.requested|below_threshold')
  return seq
end

local now = tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {-1, 0, ''}
end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then
  local f = redis.call('HMGET', KEYS[1], 'bal', 'st')
  return {0, tonumber(f[1] or '0'), f[2] or 'active'}
end
local bal = tonumber(redis.call('HINCRBY', KEYS[1], 'bal', ARGV[2]))
local f = redis.call('HMGET', KEYS[1], 'res', 'cl', 'lowth', 'st', 'rth', 'rq', 'hr', 'min')
local avail = bal + tonumber(f[2] or '0') - tonumber(f[1] or '0')
local pinned = f[7]
if pinned and ARGV[3] == '1' then
  -- unpinned, the machine moves a held account with credit back to active (account.resume)
  redis.call('HDEL', KEYS[1], 'hr')
  pinned = nil
end
local st, signal = transition(f[4] or 'active', avail, tonumber(f[3] or '0'), pinned,
  usable_seconds(f[8], now))
if st ~= f[4] then
  redis.call('HSET', KEYS[1], 'st', st)
end
if signal then
  local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  redis.call('RPUSH', KEYS[3], seq .. '|' .. signal)
end
recharge_trigger(KEYS[1], avail, f[5], f[6])
return {1, bal, st}
