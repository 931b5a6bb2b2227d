-- Drop signals from an account's outbox once they are published (acknowledged by the broker).
--
-- KEYS[1] outbox list of the account ("seq|type|reason", oldest first)
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
return removed
