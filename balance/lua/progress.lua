-- A live call's interim update (call.progress) or its answer (call.answered): extend its
-- reservation by the next grant, or, when the credit cannot cover it, extend it as far as the
-- credit goes and queue one call.terminate at the moment the credit runs out. "Credit" here is
-- the minute bucket's free seconds first, then money, as debit.lua will charge the call.
--
-- KEYS[1] account hash   KEYS[2] reservations hash   KEYS[3] outbox list
-- ARGV[1] call_id   ARGV[2] now   ARGV[3] started_at (answered_at, unix s)   ARGV[4] elapsed_s
-- ARGV[5] grant_s   ARGV[6] grace_s   ARGV[7] max_s
-- ARGV[8] plan      "included_s,period_start,period_end[,previous_start]" of the account's plan
--                   for the current period and the one before, or "" (see reserve.lua): a call
--                   answered in the period before is extended on that period's allowance
--
-- Reply: {outcome, until_s, outbox}
--   outcome "none" (no reservation: the call was never authorized), "closed" (hung up
--   already: a late or replayed update changes nothing), "ok" (already covered),
--   "extended", "terminate" (call.terminate queued now) or "terminating" (queued before);
--   until_s: seconds after the answer the reservation covers, or terminate_at (unix s);
--   outbox: pending signals "seq|type|reason[|call_id|terminate_at]" joined by ";".
-- Idempotent: the same update again changes nothing and queues nothing.

--#include lib/billing.lua
--#include lib/free_seconds.lua
--#include lib/outbox.lua

local call_id, now, started_at = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local elapsed, grant_s = tonumber(ARGV[4]), tonumber(ARGV[5])
local grace_s, max_s = tonumber(ARGV[6]), tonumber(ARGV[7])
local plan = ARGV[8] or ''

local function pending()
  local f = redis.call('HMGET', KEYS[1], 'seq', 'ack')
  if tonumber(f[1] or '0') > tonumber(f[2] or '0') then
    return table.concat(redis.call('LRANGE', KEYS[3], 0, -1), ';')
  end
  return ''
end

local raw = redis.call('HGET', KEYS[2], call_id)
if not raw then
  return {'none', 0, ''}
end
local p = {}
for v in string.gmatch(raw, '[^|]+') do
  p[#p + 1] = tonumber(v)
end
local reserved, granted, rate, fee, initial, subsequent = p[1], p[2], p[4], p[5], p[6], p[7]
local started, term, held = p[8], p[9], p[10] or 0
if started == 0 then
  started = started_at
end
local function save(expires_at)
  redis.call('HSET', KEYS[2], call_id, string.format('%d|%d|%d|%d|%d|%d|%d|%d|%d|%d', reserved,
    granted, expires_at, rate, fee, initial, subsequent, started, term, held))
end
-- Move the call's reservation to covering d seconds: seconds and money as they are free now.
local function cover(d, free)
  local money, secs = hold(d, free, rate, fee, initial, subsequent)
  if money ~= reserved then
    redis.call('HINCRBY', KEYS[1], 'res', string.format('%d', money - reserved))
  end
  reserved, held, granted = money, secs, d
end
if term == -1 then
  return {'closed', 0, ''}
end
if term > 0 then
  return {'terminating', term, pending()}
end
local f = redis.call('HMGET', KEYS[1], 'bal', 'res', 'cl', 'st', 'min')
local function terminate(at, reason)
  term = at
  -- The call id is percent-escaped in the entry: whatever its bytes, it can never hold a
  -- separator of the entry ("|") or of the replies that carry outboxes (";", tab, newline).
  local esc = string.gsub(call_id, '[%c%%;|,]', function(ch)
    return string.format('%%%02X', string.byte(ch))
  end)
  queue_signal(KEYS[1], KEYS[3], 'call.terminate|' .. reason .. '|' .. esc .. '|' .. at)
  save(now + math.max(granted - elapsed, 0) + grace_s)
  return {'terminate', at, pending()}
end
if f[4] == 'suspended' then
  return terminate(now, 'account_suspended') -- suspension blocks calls in progress too
end
local want = math.min(elapsed + grant_s, max_s)
if want <= granted then
  save(now + (granted - elapsed) + grace_s)
  return {'ok', granted, pending()}
end
local free = bucket_free(KEYS[2], f[5], plan, started, held)
local avail = tonumber(f[1]) + tonumber(f[3] or '0') - tonumber(f[2] or '0')
local need = hold(want, free, rate, fee, initial, subsequent) - reserved
if need <= avail then
  cover(want, free)
  save(now + (granted - elapsed) + grace_s)
  return {'extended', granted, pending()}
end
-- Not enough for the next grant: take the call as far as the credit goes, then end it there.
local reach = affordable(avail + reserved, free, rate, fee, initial, subsequent, max_s)
if reach > granted then
  cover(reach, free)
end
return terminate(started + granted, 'credit_exhausted')
