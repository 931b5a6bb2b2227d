-- Seconds the minute bucket (the account hash's "min" field, see debit.lua) can still give a
-- call answered at ``now`` (grants valid then), for the scripts that decide the account's
-- state: money exhausted with minutes left is low, not hold.
local function usable_seconds(bucket, now)
  local s = 0
  for rem, from, to in string.gmatch(bucket or '', '[^,;]+,(%d+),(%d+),(%d+)') do
    if tonumber(from) <= now and now < tonumber(to) then
      s = s + tonumber(rem)
    end
  end
  return s
end
