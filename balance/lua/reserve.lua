-- Authorize a call: reserve its first grant, atomically with every other call of the account,
-- so concurrent calls never together reserve more than the available credit, nor more seconds
-- than the minute bucket has left.
--
-- KEYS[1] account hash (bal, res, cl, st, min, hr, mc, lc, ...; balance/keys.py account)
-- KEYS[2] reservations hash (keys.reservations): field = call_id, value = see RSV below
--          (and its holders index, keys.holders, of the same hash tag: lib/free_seconds.lua)
-- ARGV[1] call_id      ARGV[2] direction ("inbound" | "outbound")   ARGV[3] now (unix s)
-- ARGV[4] grant_s      seconds to reserve up front (e.g. 300)
-- ARGV[5] grace_s      a reservation not closed by then + grace_s is swept
-- ARGV[6] max_s        the longest call the service allows (caps free destinations)
-- ARGV[7] rate_per_min ARGV[8] connect_fee (micro-units)  ARGV[9] initial_s ARGV[10] subsequent_s
-- ARGV[11] force       "1" for a call already answered without an authorization: instead of
--                      a credit denial, open a reservation of nothing, so the next progress
--                      update ends the call where its credit runs out
-- ARGV[12] plan        "included_s,period_start,period_end[,previous_start]" of the account's
--                      plan for the current period (as debit.lua gets it), or "" (no plan)
--
-- RSV value: "reserved|granted_s|expires_at|rate|fee|initial|subsequent|started_at|terminate_at
--   |held_s" (one line): started_at is 0 until call.answered; terminate_at is 0 until
--   call.terminate was queued, -1 once the hangup closed the call (debit.lua's marker, nine
--   fields); held_s, the seconds of the minute bucket the grant covers (the rest is covered by
--   reserved micro-units), is absent from reservations made before it existed: 0.
--
-- Concurrent calls: an account whose plan limits them ("mc" > 0) has a new call beyond the
-- limit denied concurrent_call_limit, inbound or outbound, counting the live calls of
-- lib/calls.lua (kept in "lc", which this script moves for every account, limited or not). A
-- retry of a call_id already allowed is no new call: it gets its first answer at the limit too.
-- A forced call (ARGV[11]) is up already: it is counted, never barred by the limit.
--
-- Reply: {decision, reason, max_duration_s, reserved, granted_s, expires_at, held_s}
--   decision "allow" | "deny"; reason "ok" or the contract's deny reason.
--   max_duration_s == granted_s: the answer grants exactly what it reserved (at most grant_s,
--   less when that is all the credit buys), never what the whole credit would buy.
--   A second call for the same call_id returns the first answer (authorize is retried): the
--   stored grant, reservation and expiry, whatever the credit is now.

--#include lib/billing.lua
--#include lib/free_seconds.lua
--#include lib/calls.lua

local call_id, direction, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local grant_s, grace_s, max_s = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local rate, fee = tonumber(ARGV[7]), tonumber(ARGV[8])
local initial, subsequent = tonumber(ARGV[9]), tonumber(ARGV[10])
local plan = ARGV[12] or ''

local f = redis.call('HMGET', KEYS[1], 'bal', 'res', 'cl', 'st', 'min', 'hr', 'mc', 'lc')
if not f[1] then
  return {'deny', 'unknown_account', 0, 0, 0, 0, 0}
end
local force = ARGV[11] == '1'
local avail = tonumber(f[1]) + tonumber(f[3] or '0') - tonumber(f[2] or '0')
local prior = redis.call('HGET', KEYS[2], call_id)
if prior then
  local p = {}
  for v in string.gmatch(prior, '[^|]+') do
    p[#p + 1] = tonumber(v)
  end
  if p[9] == -1 then
    return {'deny', 'call_closed', 0, 0, 0, 0, 0}
  end
  -- The first answer again, from what the first call stored: the grant is the reservation, so
  -- the answer does not depend on the credit now (other calls may have spent it since).
  return {'allow', 'ok', p[2], p[1], p[2], p[3], p[10] or 0}
end
local st = f[4] or 'active'
local live = f[8] and tonumber(f[8])
if not live then
  -- No count yet (see lib/calls.lua): the calls are counted once, and the count kept from now.
  live = count_live(KEYS[2])
  redis.call('HSET', KEYS[1], 'lc', string.format('%d', live))
end
local limit = tonumber(f[7] or '0')
local barred = nil
if st == 'suspended' then
  barred = 'account_suspended'
elseif st == 'hold' and direction ~= 'inbound' and f[6] then
  -- A hold pinned for a reason other than money ("hr": the recharge cap, a declined card):
  -- credit will not lift it, the reason it was pinned must. A hold on money alone answers
  -- insufficient_credit below, as any account whose credit buys nothing (seconds left in the
  -- bucket still buy calls).
  barred = 'account_on_hold'
elseif limit > 0 and live >= limit and not force then
  -- Before the credit is computed: a burst at the limit costs no reading of the bucket.
  barred = 'concurrent_call_limit'
end
if barred and not force then
  return {'deny', barred, 0, 0, 0, 0, 0}
end
local free, listed = bucket_free(KEYS[2], f[5], plan, now, 0)
local d = affordable(avail, free, rate, fee, initial, subsequent, max_s)
if not barred and d == 0 and direction ~= 'inbound' then
  barred = 'insufficient_credit'
end
local granted, reserved, held
if barred and not force then
  return {'deny', barred, 0, 0, 0, 0, 0}
elseif barred then
  granted, reserved, held, d = 0, 0, 0, 0 -- the next progress update terminates it at once
elseif d == 0 then
  -- Inbound still rings on hold: allowed, charged at hangup, with nothing reserved.
  granted, reserved, held, d = grant_s, 0, 0, grant_s
else
  granted = math.min(grant_s, d)
  reserved, held = hold(granted, free, rate, fee, initial, subsequent)
end
local expires_at = now + granted + grace_s
-- What is granted is what is reserved: a switch that only sets a timer from max_duration_s can
-- never talk past what the credit covers; longer calls extend through call.progress.
d = granted
if reserved > 0 then
  redis.call('HINCRBY', KEYS[1], 'res', string.format('%d', reserved))
end
redis.call('HSET', KEYS[2], call_id, string.format('%d|%d|%d|%d|%d|%d|%d|0|0|%d', reserved,
  granted, expires_at, rate, fee, initial, subsequent, held))
list_holder(KEYS[2], call_id, listed) -- it may hold seconds now or after progress
redis.call('HSET', KEYS[1], 'lc', string.format('%d', live + 1))
return {'allow', 'ok', d, reserved, granted, expires_at, held}
