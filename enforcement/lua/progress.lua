-- A live call's interim update (call.progress) or its answer (call.answered): extend its
-- reservation by the next grant, or, when the credit cannot cover it, extend it as far as the
-- credit goes and queue one call.terminate at the moment the credit runs out.
--
-- KEYS[1] account hash   KEYS[2] reservations hash   KEYS[3] outbox list
-- ARGV[1] call_id   ARGV[2] now   ARGV[3] started_at (answered_at, unix s)   ARGV[4] elapsed_s
-- ARGV[5] grant_s   ARGV[6] grace_s   ARGV[7] max_s
--
-- Reply: {outcome, until_s, outbox}
--   outcome "none" (no reservation: the call was never authorized), "closed" (hung up
--   already: a late or replayed update changes nothing), "ok" (already covered),
--   "extended", "terminate" (call.terminate queued now) or "terminating" (queued before);
--   until_s: seconds after the answer the reservation covers, or terminate_at (unix s);
--   outbox: pending signals "seq|type|reason[|call_id|terminate_at]" joined by ";".
-- Idempotent: the same update again changes nothing and queues nothing.

-- Billing as metering/rating.py does it, in micro-units, always rounding up.
local function billed(d, initial, subsequent)
  if d <= 0 then
    return 0
  end
  if d <= initial then
    return initial
  end
  return initial + math.ceil((d - initial) / subsequent) * subsequent
end

local function cost(d, rate, fee, initial, subsequent)
  local b = billed(d, initial, subsequent)
  if b == 0 then
    return 0
  end
  return fee + math.ceil(rate * b / 60)
end

-- The longest duration (whole increments) whose cost fits in avail; 0 if not even the first.
local function affordable(avail, rate, fee, initial, subsequent, max_s)
  local budget = avail - fee
  if budget < 0 then
    return 0
  end
  if rate == 0 then
    return max_s
  end
  local b = math.floor(budget * 60 / rate)
  if b < initial then
    return 0
  end
  local d = initial + math.floor((b - initial) / subsequent) * subsequent
  if d > max_s then
    d = max_s
  end
  return d
end

local call_id, now, started_at = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local elapsed, grant_s = tonumber(ARGV[4]), tonumber(ARGV[5])
local grace_s, max_s = tonumber(ARGV[6]), tonumber(ARGV[7])

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
local started, term = p[8], p[9]
if started == 0 then
  started = started_at
end
local function save(expires_at)
  redis.call('HSET', KEYS[2], call_id, string.format('%d|%d|%d|%d|%d|%d|%d|%d|%d', reserved,
    granted, expires_at, rate, fee, initial, subsequent, started, term))
end
if term == -1 then
  return {'closed', 0, ''}
end
if term > 0 then
  return {'terminating', term, pending()}
end
local f = redis.call('HMGET', KEYS[1], 'bal', 'res', 'cl', 'st')
local function terminate(at, reason)
  term = at
  local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  redis.call('RPUSH', KEYS[3], seq .. '|call.terminate|' .. reason .. '|' .. call_id .. '|' .. at)
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
local need = cost(want, rate, fee, initial, subsequent) - reserved
local avail = tonumber(f[1]) + tonumber(f[3] or '0') - tonumber(f[2] or '0')
if need <= avail then
  if need > 0 then
    redis.call('HINCRBY', KEYS[1], 'res', string.format('%d', need))
  end
  reserved, granted = reserved + math.max(need, 0), want
  save(now + (granted - elapsed) + grace_s)
  return {'extended', granted, pending()}
end
-- Not enough for the next grant: take the call as far as the credit goes, then end it there.
local reach = affordable(avail + reserved, rate, fee, initial, subsequent, max_s)
if reach > granted then
  local more = cost(reach, rate, fee, initial, subsequent) - reserved
  if more > 0 then
    redis.call('HINCRBY', KEYS[1], 'res', string.format('%d', more))
    reserved = reserved + more
  end
  granted = reach
end
return terminate(started + granted, 'credit_exhausted')
