-- Give back the seconds a call drew from the minute bucket, once: the compensation of a debit
-- Redis applied again for an event the ledger already had (its memory of the event was lost),
-- which drew the call's included seconds a second time (metering/apply.py compensate).
--
-- KEYS[1] account hash   KEYS[2] applied-credits hash (balance/keys.py credits)
-- KEYS[3] the applied-events hash of the event's day (keys.applied)
-- ARGV[1] undo id      "undraw:" .. event key in hex; remembered in the applied-credits hash
--                      (with the seconds), so a second call gives nothing back again
-- ARGV[2] event key    16 raw bytes   ARGV[3] drawn_s   ARGV[4] answered_at (unix s)
--
-- Where the seconds go: debit.lua draws from the grants valid at the call's answer, soonest to
-- expire first. When its memory of the event lists the grants it took from (after "amount|fp"
-- and the seconds drawn: "|id,take,valid_from,expires_at;..."), each take goes back to its
-- grant, re-created if it was dropped as spent. A memory without that list (debit.lua as it
-- was) says only how many: they go back to the grant the draw stopped at, the soonest to
-- expire of those valid at the answer with seconds left (or, all spent, the last of them) -
-- exact when the call drew from one grant, and never more seconds than were drawn.
--
-- Reply: the seconds given back; 0 when given back before (or nothing drawn, or no account);
-- minus drawn_s when no grant valid at the answer is left to take them.
local drawn = tonumber(ARGV[3])
if drawn <= 0 or redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return 0
end
local grants = {}
for id, rem, from, to in string.gmatch(redis.call('HGET', KEYS[1], 'min') or '',
    '([^,;]+),(%d+),(%d+),(%d+)') do
  grants[#grants + 1] = {id, tonumber(rem), tonumber(from), tonumber(to)}
end
table.sort(grants, function(x, y) return x[4] < y[4] end)
local takes = {}
local prior = redis.call('HGET', KEYS[3], ARGV[2])
if prior then
  local sep = string.find(prior, '|', 1, true)
  local list = string.match(string.sub(prior, sep + 9), '^%d*|(.*)$')
  for id, take, from, to in string.gmatch(list or '', '([^,;]+),(%d+),(%d+),(%d+)') do
    takes[#takes + 1] = {id, tonumber(take), tonumber(from), tonumber(to)}
  end
end
if #takes == 0 then
  local at = tonumber(ARGV[4])
  local target = nil
  for _, g in ipairs(grants) do
    if g[3] <= at and at < g[4] then
      target = g
      if g[2] > 0 then
        break
      end
    end
  end
  if not target then
    return -drawn
  end
  takes[1] = {target[1], drawn, target[3], target[4]}
end
for _, t in ipairs(takes) do
  local found = false
  for _, g in ipairs(grants) do
    if g[1] == t[1] then
      g[2] = g[2] + t[2]
      found = true
      break
    end
  end
  if not found then
    grants[#grants + 1] = t
  end
end
local out = {}
for i, g in ipairs(grants) do
  out[i] = string.format('%s,%d,%d,%d', g[1], g[2], g[3], g[4])
end
redis.call('HSET', KEYS[1], 'min', table.concat(out, ';'))
redis.call('HSET', KEYS[2], ARGV[1], drawn)
return drawn
