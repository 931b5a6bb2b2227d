-- Close a reservation: give back what it still holds (the hangup's charge is debited apart),
-- or, for the sweep, charge it provisionally (docs/design/call-credit.md "The life of a
-- reservation"). Its seconds of the minute bucket are free again once the reservation is gone
-- (reserve.lua sums the holds of the reservations that exist), so only the money needs giving
-- back.
--
-- KEYS[1] account hash   KEYS[2] reservations hash
-- ARGV[1] call_id   ARGV[2] now   ARGV[3] only_if_expired ("1": the sweep, which must not
--   release a reservation that was extended since it was listed)
-- ARGV[4] keep_s (sweep only) how long a provisional marker stays (waiting for a late hangup)
--
-- The sweep charges an expired reservation that held anything (money or bucket seconds) in
-- this script: its reserved micro-units leave "res" and "bal" together (available credit does
-- not move), and the reservation becomes a provisional marker, closed like debit.lua's (a late
-- call.answered / call.progress cannot open it again) but still holding its bucket seconds:
--   "0|0|keep_until|0|0|1|1|0|-1|held_s|p<charged>|<charged_at>"
-- debit.lua settles a late hangup against it. A reservation that held nothing is released.
--
-- Reply: {released, held_s, provisional, charged_at, new}
--   {micro-units, seconds, 0, 0, 0} released ({0, 0, ...} when there was no such reservation,
--     or only the closed marker a hangup leaves, or an expired provisional marker: its seconds
--     are free again and its charge stands);
--   {minus its expiry (unix s), 0, 0, 0, 0} when it has not expired yet (sweep only: the sweep
--     lists it again at that time);
--   {minus the marker's end, held_s, charged, charged_at, 1} charged provisionally now, or the
--     same with new = 0 when the marker was already there (a retried sweep: nothing changes;
--     the caller writes the ledger row again, idempotently).
--
-- Concurrent calls: closing a live reservation, released or charged, frees the call's slot
-- ("lc" less one, lib/calls.lua); dropping a marker frees nothing (its call was closed already).

--#include lib/calls.lua

local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then
  return {0, 0, 0, 0, 0}
end
local reserved, _, expires_at = string.match(raw, '^(%d+)|(%d+)|(%d+)|')
local charged, charged_at = string.match(raw, '|p(%d+)|(%d+)$')
if charged then
  if tonumber(expires_at) > tonumber(ARGV[2]) then
    -- still waiting for a late hangup: only the sweep reads it, and changes nothing
    if ARGV[3] ~= '1' then
      return {-tonumber(expires_at), 0, 0, 0, 0}
    end
    local held_s = string.match(raw, '^[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|(%d+)')
    return {-tonumber(expires_at), tonumber(held_s), tonumber(charged), tonumber(charged_at), 0}
  end
  redis.call('HDEL', KEYS[2], ARGV[1])
  return {0, 0, 0, 0, 0}
end
if ARGV[3] == '1' and tonumber(expires_at) > tonumber(ARGV[2]) then
  return {-tonumber(expires_at), 0, 0, 0, 0}
end
local held = tonumber(string.match(raw,
  '^[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|(%d+)') or '0')
local amount = tonumber(reserved)
local exists = redis.call('EXISTS', KEYS[1]) == 1
if ARGV[3] == '1' and exists and (amount > 0 or held > 0)
    and string.match(raw, '^[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|(-?%d+)') ~= '-1' then
  local now = tonumber(ARGV[2])
  local keep_until = now + tonumber(ARGV[4])
  redis.call('HSET', KEYS[2], ARGV[1],
    string.format('0|0|%d|0|0|1|1|0|-1|%d|p%d|%d', keep_until, held, amount, now))
  calls_closed(KEYS[1], 1)
  if amount > 0 then
    redis.call('HINCRBY', KEYS[1], 'res', string.format('%d', -amount))
    redis.call('HINCRBY', KEYS[1], 'bal', string.format('%d', -amount))
  end
  return {-keep_until, held, amount, now, 1}
end
redis.call('HDEL', KEYS[2], ARGV[1])
if is_live(raw) then
  calls_closed(KEYS[1], 1)
end
if amount > 0 and exists then
  redis.call('HINCRBY', KEYS[1], 'res', '-' .. reserved)
end
return {amount, held, 0, 0, 0}
