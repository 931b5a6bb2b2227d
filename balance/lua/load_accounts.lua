-- Create (or rebuild) many accounts' real-time state from the book of record, in one call:
-- load_account.lua's "create" for each account, for a rebuild of thousands at a time.
--
-- KEYS: the account hash of each account (balance/keys.py account). Its credits hash is derived
--   from it by lib/keys.lua: same hash tag, same slot, so on a Redis Cluster one call carries
--   one slot's accounts (balance/slots.py).
-- ARGV[1] one JSON array, an entry per account in KEYS order: [fields, credited], where fields
--   is the flat list field, value, field, value ... to set on the account hash (every value a
--   string: JSON numbers would reach Lua as doubles) and credited the credit ids the ledger
--   already has but Redis may not have been told of, remembered as applied in the credits hash
--   (see load_account.lua). Python decides the fields (balance/store.py, create_accounts), so
--   the fields an account starts with are written out in one place; JSON escapes every value,
--   so none can change how another is read.
--
-- Reply: one integer per account, KEYS order: 1 if written, 0 if it existed (left as it was).
--#include lib/keys.lua
local records = cjson.decode(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    out[i] = 0
  else
    local record = records[i]
    redis.call('HSET', key, unpack(record[1]))
    local credits = key .. CREDITS_SUFFIX
    for _, id in ipairs(record[2]) do
      redis.call('HSET', credits, id, 0)
    end
    out[i] = 1
  end
end
return out
