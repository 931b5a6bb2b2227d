-- Buy seconds for an account's minute bucket from its balance, once per grant id.
--
-- KEYS[1] account hash   KEYS[2] applied-credits hash   KEYS[3] outbox list
-- ARGV[1] grant_id     "b" .. purchase id; its debit is remembered in the applied-credits hash
--                      as "grant:" .. grant_id, so a retry takes nothing again
-- ARGV[2] price        micro-units (>= 0) taken from the balance
-- ARGV[3] seconds      seconds added to the bucket
-- ARGV[4] valid_from   unix seconds   ARGV[5] expires_at   unix seconds
-- ARGV[6] now          unix seconds
--
-- Reply: {result, balance, status}; result 1 applied, 0 a repeat (nothing changed), -1 unknown
-- account, -2 the available credit (balance + credit limit - reserved) does not cover the price.
-- The bucket format is debit.lua's ("min" field); a spent or expired grant is dropped here too.

--#include lib/state.lua
--#include lib/bucket.lua
--#include lib/outbox.lua
--#include lib/recharge.lua

local grant_id = ARGV[1]
local price = tonumber(ARGV[2])
local now = tonumber(ARGV[6])
local f = redis.call('HMGET', KEYS[1], 'bal', 'res', 'cl', 'lowth', 'st', 'min', 'rth', 'rq', 'hr')
if not f[1] then
  return {-1, 0, ''}
end
local bal = tonumber(f[1])
if redis.call('HEXISTS', KEYS[2], 'grant:' .. grant_id) == 1 then
  return {0, bal, f[5] or 'active'}
end
local avail = bal + tonumber(f[3] or '0') - tonumber(f[2] or '0')
if price > 0 and avail < price then
  return {-2, bal, f[5] or 'active'}
end
redis.call('HSET', KEYS[2], 'grant:' .. grant_id, -price)
local keep = {}
for id, rem, from, to in string.gmatch(f[6] or '', '([^,;]+),(%d+),(%d+),(%d+)') do
  if tonumber(to) + 86400 > now and (tonumber(rem) > 0 or string.sub(id, 1, 1) == 'p') then
    keep[#keep + 1] = id .. ',' .. rem .. ',' .. from .. ',' .. to
  end
end
keep[#keep + 1] = grant_id .. ',' .. ARGV[3] .. ',' .. ARGV[4] .. ',' .. ARGV[5]
redis.call('HSET', KEYS[1], 'min', table.concat(keep, ';'))
if price > 0 then
  bal = tonumber(redis.call('HINCRBY', KEYS[1], 'bal', string.format('%d', -price)))
end
local secs = usable_seconds(table.concat(keep, ';'), now)
local st, signal = transition(f[5] or 'active', avail - price, tonumber(f[4] or '0'), f[9], secs)
if st ~= f[5] then
  redis.call('HSET', KEYS[1], 'st', st)
end
if signal then
  queue_signal(KEYS[1], KEYS[3], signal)
end
recharge_trigger(KEYS[1], KEYS[3], avail - price, f[7], f[8])
return {1, bal, st}
