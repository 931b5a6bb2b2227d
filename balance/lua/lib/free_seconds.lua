-- Seconds of the minute bucket (the account's "min" field, see debit.lua) a call answered at
-- `at` may hold: what the grants valid then have left (the plan's grant for the period in full
-- while debit.lua has not created it, which it does at the period's first charge), less what
-- the account's calls hold, the asking call's own `own` seconds excepted. The holds are summed
-- from the reservations themselves, not kept in a counter: the hangup's debit.lua overwrites a
-- reservation with a closed marker, which holds nothing, so its seconds are free again in the
-- same script that draws them. Money-only accounts never read the reservations.
--
-- Which reservations are read: not the whole reservations hash, which keeps every closed
-- call's marker for a day (2,000 markers cost 247 us of Redis per authorization), but those
-- listed in the account's holders index (balance/keys.py holders: a hash of call ids), which
-- holds every reservation that may hold seconds: each live one (call.progress may give it
-- seconds later) and each closed one that still holds (the sweep's provisional marker). So the
-- cost follows the live calls, not the day's. Why the index stays whole, by who writes the
-- reservations hash:
--   - reserve.lua opens a reservation, and lists it (bucket_free's second answer says when);
--   - progress.lua only changes a live reservation (listed); release.lua turns a live one into
--     a marker (listed) or drops one; debit.lua writes a closed marker holding nothing; a
--     restored provisional marker (ReservationStore.restore_provisional) holds nothing. None
--     can make an unlisted entry hold seconds, and a closed entry never opens again.
-- An entry found gone or closed holding nothing is dropped from the index as it is read. While
-- the bucket gives nothing (usable 0) no reservation can take seconds: the index is deleted,
-- and calls are not listed; the next call that finds seconds in the bucket builds it from one
-- scan of the reservations hash (as for an account from before the index, or rebuilt). Like
-- "lc" (lib/calls.lua), it assumes every process runs scripts that know it: a rolling deploy
-- from before it should delete the holders keys (or restart the API processes together).
--
-- Returns the free seconds, and whether the index is kept (the caller lists a new reservation
-- only then).

--#include lib/keys.lua

-- The held seconds of a reservation value: its tenth field (absent: 0, a hangup's marker).
local function held_in(v)
  local s = string.match(v, '^[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|(%d+)')
  return s and tonumber(s) or 0
end

-- The holders index of a reservations hash (same account, same hash tag).
local function holders_of(rsv)
  return string.sub(rsv, 1, #rsv - #RESERVATIONS_SUFFIX) .. HOLDERS_SUFFIX
end

-- The seconds the account's reservations hold, from the index (built first if absent).
local function held_seconds(rsv, idx)
  local held = 0
  if redis.call('EXISTS', idx) == 0 then
    local all = redis.call('HGETALL', rsv)
    local add = {}
    for i = 1, #all, 2 do
      local v = all[i + 1]
      local h = held_in(v)
      if h > 0 or not string.find(v, '-', 1, true) then -- holding, or live (lib/calls.lua)
        held = held + h
        add[#add + 1] = all[i]
        add[#add + 1] = '1'
      end
    end
    redis.call('HSET', idx, '', '1') -- the index exists, even with no call in it
    for i = 1, #add, 1000 do
      redis.call('HSET', idx, unpack(add, i, math.min(i + 999, #add)))
    end
    return held
  end
  local ids = redis.call('HKEYS', idx)
  local gone = {}
  for i = 1, #ids, 500 do
    local j = math.min(i + 499, #ids)
    local vals = redis.call('HMGET', rsv, unpack(ids, i, j))
    for k = 1, j - i + 1 do
      local id, v = ids[i + k - 1], vals[k]
      if id ~= '' then
        local h = v and held_in(v) or 0
        if h > 0 or (v and not string.find(v, '-', 1, true)) then
          held = held + h
        else
          gone[#gone + 1] = id -- gone, or closed holding nothing: it never holds again
        end
      end
    end
  end
  for i = 1, #gone, 1000 do
    redis.call('HDEL', idx, unpack(gone, i, math.min(i + 999, #gone)))
  end
  return held
end

local function bucket_free(rsv, min, plan, at, own)
  -- "included_s,period_start,period_end[,previous_start]": the period before ends where this
  -- one starts, and counts only while debit.lua would still create its grant (a day past it)
  local p_s, p_from, p_to, p_prev = string.match(plan, '^(%d+),(%d+),(%d+),?(%d*)$')
  local pid = p_from and ('p' .. p_from)
  local prev = p_prev and p_prev ~= '' and ('p' .. p_prev)
  local usable = 0
  for id, rem, from, to in string.gmatch(min or '', '([^,;]+),(%d+),(%d+),(%d+)') do
    if id == pid then
      pid = nil -- created: what it has left counts, not the allowance
    elseif id == prev then
      prev = nil
    end
    if tonumber(from) <= at and at < tonumber(to) then
      usable = usable + tonumber(rem)
    end
  end
  if pid and tonumber(p_s) > 0 and tonumber(p_from) <= at and at < tonumber(p_to) then
    usable = usable + tonumber(p_s)
  end
  if prev and tonumber(p_s) > 0 and tonumber(p_prev) <= at and at < tonumber(p_from) then
    usable = usable + tonumber(p_s)
  end
  local idx = holders_of(rsv)
  if usable == 0 then
    redis.call('DEL', idx) -- nothing to hold: not kept (a no-op for money-only accounts)
    return 0, false
  end
  return math.max(usable - held_seconds(rsv, idx) + own, 0), true
end

-- A reservation reserve.lua has just opened, listed when bucket_free said the index is kept.
local function list_holder(rsv, call_id, listed)
  if listed then
    redis.call('HSET', holders_of(rsv), call_id, '1')
  end
end
