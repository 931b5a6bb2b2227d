-- Drop signals from an account's outbox once they are published (acknowledged by the broker).
--
-- KEYS[1] outbox list of the account ("seq|type|reason", oldest first)
-- KEYS[2] account hash: its "ack" field records the highest acknowledged seq, so debit.lua
--         reads the outbox only when something is pending
-- ARGV[1] acked_seq  every entry with seq <= acked_seq is removed
--
-- Reply: the number of entries removed. Entries pushed after the publish stay.
local acked = tonumber(ARGV[1])
local removed = 0
while true do
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head then
    break
  end
  local seq = tonumber(string.sub(head, 1, string.find(head, '|', 1, true) - 1))
  if seq > acked then
    break
  end
  redis.call('LPOP', KEYS[1])
  removed = removed + 1
end
if redis.call('EXISTS', KEYS[2]) == 1 and tonumber(redis.call('HGET', KEYS[2], 'ack') or '0') < acked then
  redis.call('HSET', KEYS[2], 'ack', acked)
end
return removed
