-- A number's renewal, hold and release (enforcement/numbers.py decides which, from the
-- numbers inventory in PostgreSQL; docs/design/numbers.md). Each step happens once per token.
--
-- KEYS[1] account hash   KEYS[2] applied-credits hash   KEYS[3] outbox list
-- ARGV[1] action   "renew" | "hold" | "release"
-- ARGV[2] number   E.164 ("+" and up to 15 digits)
-- ARGV[3] token    what makes the step once-only: "<lease>:<period>" for a renewal or a hold
--                  (lease: the number's activation count, period "YYYY-MM"), "<lease>" for a
--                  release; remembered in the applied-credits hash as "n<r|h|x>:<number>:<token>"
-- ARGV[4] fee      micro-units (>= 0) a renewal takes; "0" for the others
-- ARGV[5] now      unix seconds of the caller's clock: which grants of the minute bucket are
--                  usable, for where the account's status lands after a renewal
-- ARGV[6] reason   a short code: the hold's or the release's reason (number.hold|reason|number);
--                  for a renewal, "resume" to queue number.resume (the number was on hold) or "-"
--
-- A renewal never takes the available credit (balance + credit limit - reserved) below zero:
-- when the fee does not fit, nothing is taken and the auto-recharge trigger gets its chance.
-- Reply: {result, balance, status, recharge}: result 1 done, 0 done before under this token
-- (nothing changed), -1 unknown account, -2 the available credit does not cover the fee;
-- recharge (for -2 and 0) 1 when an auto-recharge trigger is open (just fired or still
-- pending), else 0.

--#include lib/state.lua
--#include lib/bucket.lua
--#include lib/outbox.lua
--#include lib/recharge.lua

local action, number, token = ARGV[1], ARGV[2], ARGV[3]
local fee, now, reason = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local marks = {renew = 'nr:', hold = 'nh:', release = 'nx:'}
if not marks[action] then
  return redis.error_reply('ERR number: unknown action')
end
-- Each value ends up in a '|'-separated outbox entry or a ':'-separated marker: checked whole.
if not number or #number > 16 or not string.match(number, '^%+[1-9]%d+$') then
  return redis.error_reply('ERR number: not an E.164 number')
end
if not token or #token > 32 or not string.match(token, '^[0-9][0-9:-]*$') then
  return redis.error_reply('ERR number: bad token')
end
if not fee or fee < 0 or fee ~= math.floor(fee) or (action ~= 'renew' and fee ~= 0) then
  return redis.error_reply('ERR number: fee must be whole micro-units >= 0, 0 but to renew')
end
if not now or now ~= math.floor(now) then
  return redis.error_reply('ERR number: now must be whole unix seconds')
end
if not reason or #reason > 64 or not string.match(reason, '^[a-z0-9_]+$') then
  if not (action == 'renew' and reason == '-') then
    return redis.error_reply('ERR number: reason must be a short code')
  end
end
local f = redis.call('HMGET', KEYS[1], 'bal', 'res', 'cl', 'lowth', 'st', 'min', 'rth', 'rq', 'hr')
if not f[1] then
  return {-1, 0, '', 0}
end
local bal = tonumber(f[1])
local st = f[5] or 'active'
local mark = marks[action] .. number .. ':' .. token
if redis.call('HEXISTS', KEYS[2], mark) == 1 then
  return {0, bal, st, f[8] and 1 or 0}
end
if action ~= 'renew' then
  redis.call('HSET', KEYS[2], mark, 0)
  queue_signal(KEYS[1], KEYS[3], 'number.' .. action .. '|' .. reason .. '|' .. number)
  return {1, bal, st, 0}
end
local avail = bal + tonumber(f[3] or '0') - tonumber(f[2] or '0')
if fee > avail then
  local seq = recharge_trigger(KEYS[1], KEYS[3], avail, f[7], f[8])
  return {-2, bal, st, (seq or f[8]) and 1 or 0}
end
redis.call('HSET', KEYS[2], mark, -fee)
if fee > 0 then
  bal = tonumber(redis.call('HINCRBY', KEYS[1], 'bal', string.format('%d', -fee)))
end
if reason == 'resume' then
  queue_signal(KEYS[1], KEYS[3], 'number.resume|renewed|' .. number)
end
local new_st, signal = transition(st, avail - fee, tonumber(f[4] or '0'), f[9],
  usable_seconds(f[6], now))
if new_st ~= st then
  redis.call('HSET', KEYS[1], 'st', new_st)
end
if signal then
  queue_signal(KEYS[1], KEYS[3], signal)
end
recharge_trigger(KEYS[1], KEYS[3], avail - fee, f[7], f[8])
return {1, bal, new_st, 0}
