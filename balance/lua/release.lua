-- Close a reservation: give back what it still holds (the hangup's charge is debited apart).
-- Its seconds of the minute bucket are free again once the reservation is gone (reserve.lua
-- sums the holds of the reservations that exist), so only the money needs giving back.
--
-- KEYS[1] account hash   KEYS[2] reservations hash
-- ARGV[1] call_id   ARGV[2] now   ARGV[3] only_if_expired ("1": the sweep, which must not
--   release a reservation that was extended since it was listed)
--
-- Reply: {micro-units, seconds} released, {0, 0} when there was no such reservation (or only
-- the closed marker a hangup leaves), or {minus its expiry (unix s), 0} when it has not expired
-- yet (sweep only: the sweep lists it again at that time).
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then
  return {0, 0}
end
local reserved, _, expires_at = string.match(raw, '^(%d+)|(%d+)|(%d+)|')
if ARGV[3] == '1' and tonumber(expires_at) > tonumber(ARGV[2]) then
  return {-tonumber(expires_at), 0}
end
local held = string.match(raw, '^[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|(%d+)')
redis.call('HDEL', KEYS[2], ARGV[1])
if tonumber(reserved) > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'res', '-' .. reserved)
end
return {tonumber(reserved), tonumber(held or '0')}
