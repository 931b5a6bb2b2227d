-- A subscription's step on an account (enforcement/subscriptions.py decides which, from the
-- subscriptions in PostgreSQL; docs/design/subscriptions.md): take a plan's fee once per
-- token, make sure the period's allowance is in the minute bucket, and move the account where
-- its credit and minutes now put it.
--
-- KEYS[1] account hash   KEYS[2] applied-credits hash   KEYS[3] outbox list
-- ARGV[1] token        what makes the step once-only ("s<period>" for a period's start,
--                      "u<period>:<plan>" for an upgrade, "i<period>" for what the month's
--                      invoice adds: DIDs and extensions beyond the plan, tax); remembered
--                      as "plan:" .. token
-- ARGV[2] fee          micro-units (>= 0) taken from the balance
-- ARGV[3] now          unix seconds of the caller's clock
-- ARGV[4] included_s   the period's allowance: the plan grant ("p" .. period_start) is created
--                      with it when the bucket has none for the period (debit.lua creates the
--                      same at the period's first call, when it comes first)
-- ARGV[5] period_start ARGV[6] period_end   unix seconds
-- ARGV[7] add_s        seconds added to the period's grant when it exists already (an
--                      upgrade's larger allowance); 0 otherwise
-- ARGV[8] cover        "1": refused whole when the available credit does not cover the fee
--                      (an upgrade); "0": taken like any charge, below zero if need be (the
--                      period's fee: seed 000 warns it can take a balance far below its
--                      threshold, and the auto-recharge trigger fires as after any charge)
--
-- A held account (money exhausted) whose new period brings minutes is re-evaluated here, at
-- once: it goes to low and account.resume is queued, not at its next charged event.
-- Reply: {result, balance, status}: result 1 done, 0 done before under this token (nothing
-- changed), -1 unknown account, -2 the available credit does not cover the fee (cover only).

--#include lib/state.lua
--#include lib/bucket.lua
--#include lib/outbox.lua
--#include lib/recharge.lua

local token, fee, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local included, p_from, p_to = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local add_s, cover = tonumber(ARGV[7]), ARGV[8]
if not token or #token > 100 or not string.match(token, '^[sui][0-9]+%-[0-9]+[A-Za-z0-9_.:-]*$') then
  return redis.error_reply('ERR plan: bad token')
end
local function whole(x)
  return x and x >= 0 and x == math.floor(x)
end
if not (whole(fee) and whole(now) and whole(included) and whole(p_from) and whole(p_to)
    and whole(add_s)) or p_to <= p_from then
  return redis.error_reply('ERR plan: fee, now, included_s, period and add_s are whole >= 0')
end
if cover ~= '0' and cover ~= '1' then
  return redis.error_reply('ERR plan: cover must be "0" or "1"')
end
local f = redis.call('HMGET', KEYS[1], 'bal', 'res', 'cl', 'lowth', 'st', 'min', 'rth', 'rq', 'hr')
if not f[1] then
  return {-1, 0, ''}
end
local bal = tonumber(f[1])
local st = f[5] or 'active'
local mark = 'plan:' .. token
if redis.call('HEXISTS', KEYS[2], mark) == 1 then
  return {0, bal, st}
end
local avail = bal + tonumber(f[3] or '0') - tonumber(f[2] or '0')
if cover == '1' and fee > avail then
  return {-2, bal, st}
end
redis.call('HSET', KEYS[2], mark, -fee)
if fee > 0 then
  bal = tonumber(redis.call('HINCRBY', KEYS[1], 'bal', string.format('%d', -fee)))
end
-- The period's grant: created if missing, topped up by add_s if there.
local pid = string.format('p%d', p_from)
local parts, have = {}, false
for id, rem, from, to in string.gmatch(f[6] or '', '([^,;]+),(%d+),(%d+),(%d+)') do
  if id == pid then
    have = true
    rem = tostring(tonumber(rem) + add_s)
  end
  parts[#parts + 1] = id .. ',' .. rem .. ',' .. from .. ',' .. to
end
if not have and included > 0 then
  parts[#parts + 1] = pid .. ',' .. included .. ',' .. p_from .. ',' .. p_to
end
local bucket = table.concat(parts, ';')
if bucket ~= (f[6] or '') then
  redis.call('HSET', KEYS[1], 'min', bucket)
end
local new_st, signal = transition(st, avail - fee, tonumber(f[4] or '0'), f[9],
  usable_seconds(bucket, now))
if new_st ~= st then
  redis.call('HSET', KEYS[1], 'st', new_st)
end
if signal then
  queue_signal(KEYS[1], KEYS[3], signal)
end
recharge_trigger(KEYS[1], KEYS[3], avail - fee, f[7], f[8])
return {1, bal, new_st}
