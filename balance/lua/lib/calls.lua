-- An account's live calls, for its concurrent-call limit (the account hash's "mc" field; none:
-- no limit). A call is live from the reservation reserve.lua opens for it until the hangup's
-- closed marker (debit.lua) or the sweep (release.lua) closes it, inbound and outbound alike:
-- an entry of the reservations hash whose terminate_at is not -1. The two markers, the
-- hangup's closed one and the sweep's provisional one, are the only values that have -1 there;
-- every other field of every value is a number >= 0, so a minus sign anywhere tells them apart.
--
-- The count is kept in the account hash's "lc" field rather than counted per authorization:
-- the reservations hash also keeps each closed call's marker for a day, so counting the hash
-- would cost every authorization of a limited account the day's calls. Each script that opens
-- or closes a call moves "lc" in the same atomic step, and only when the entry it changes was
-- live, so a replay moves nothing. A script that finds no "lc" (an account from before it, or
-- rebuilt from the ledger) leaves it absent, and the next reserve.lua counts the hash once.
local function is_live(v)
  return not string.find(v, '-', 1, true)
end

-- The live calls of a reservations hash, counted entry by entry.
local function count_live(rsv)
  local n = 0
  for _, v in ipairs(redis.call('HVALS', rsv)) do
    if is_live(v) then
      n = n + 1
    end
  end
  return n
end

-- n live calls of the account closed: "lc" less n, when it is kept. A count that would go
-- below zero was wrong: it is dropped, so the next reserve.lua counts the calls themselves.
local function calls_closed(acct, n)
  if n > 0 and redis.call('HEXISTS', acct, 'lc') == 1 then
    if redis.call('HINCRBY', acct, 'lc', string.format('%d', -n)) < 0 then
      redis.call('HDEL', acct, 'lc')
    end
  end
end
