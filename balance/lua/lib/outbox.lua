-- Queue an entry ("type|reason[|...]") in the account's outbox under the account's next seq,
-- the order the relay publishes in. Returns that seq.
local function queue_signal(acct, outbox, entry)
  local seq = redis.call('HINCRBY', acct, 'seq', 1)
  redis.call('RPUSH', outbox, seq .. '|' .. entry)
  return seq
end
