-- Seconds of the minute bucket (the account's "min" field, see debit.lua) a call answered at
-- `at` may hold: what the grants valid then have left (the plan's grant for the period in full
-- while debit.lua has not created it, which it does at the period's first charge), less what
-- the account's live calls hold, the asking call's own `own` seconds excepted. The holds are
-- summed from the reservations themselves, not kept in a counter: the hangup's debit.lua
-- overwrites a reservation with a closed marker, which holds nothing, so its seconds are free
-- again in the same script that draws them. Money-only accounts never read the reservations.
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
  if usable == 0 then
    return 0
  end
  local held = 0
  for _, v in ipairs(redis.call('HVALS', rsv)) do
    local s = string.match(v, '^[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|(%d+)')
    if s then
      held = held + tonumber(s)
    end
  end
  return math.max(usable - held + own, 0)
end
