-- Credit an account once per credit id (payment capture, adjustment, compensation).
--
-- KEYS[1] account hash   KEYS[2] applied-credits hash   KEYS[3] outbox list
-- ARGV[1] credit_id      unique id of this credit; a second call with it changes nothing
-- ARGV[2] amount         micro-units (> 0 credits, < 0 is a correcting debit)
-- ARGV[3] kind           "1" when the credit is a payment: it lifts a hold the service pinned
--                        (hr, e.g. recharge_cap), as a customer paying expects service back;
--                        "r" when it is a refund (money given back, amount < 0): it never
--                        fires auto-recharge; "0" for anything else
-- ARGV[4] now            unix seconds of the caller's clock (never Redis's own): which grants
--                        of the minute bucket are usable now, for the state machine
--
-- Reply: {applied, balance, status}; applied = 0 for a repeat, -1 for an unknown account.
-- An account on hold whose available credit is positive again goes back to active and an
-- account.resume signal is queued in its outbox. An open auto-recharge trigger ("rq") is
-- closed once the available credit is above the threshold again, re-arming the next crossing.
-- A refund that leaves the available credit at or below the threshold takes the crossing as
-- handled ("rq" = 0, no trigger): charging the card again would take back what was refunded.
-- The next crossing fires as usual once the credit was above the threshold again, or once
-- auto-recharge is set again.

--#include lib/state.lua
--#include lib/bucket.lua
--#include lib/outbox.lua
--#include lib/recharge.lua

local kind = ARGV[3]
if kind ~= '0' and kind ~= '1' and kind ~= 'r' then
  return redis.error_reply('credit: kind must be 0, 1 or r')
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
if pinned and kind == '1' then
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
  queue_signal(KEYS[1], KEYS[3], signal)
end
if kind == 'r' and f[5] and avail <= tonumber(f[5]) then
  if not f[6] then
    redis.call('HSET', KEYS[1], 'rq', 0)
  end
else
  recharge_trigger(KEYS[1], KEYS[3], avail, f[5], f[6])
end
return {1, bal, st}
