-- Create (or rebuild) an account's real-time state from the book of record.
--
-- KEYS[1] account hash
-- ARGV[1] balance  ARGV[2] credit_limit  ARGV[3] low_threshold  ARGV[4] status  ARGV[5] seq
-- ARGV[6] mode: "create" sets the account only if it does not exist; "limits" updates
--   credit_limit and low_threshold of an existing one and leaves the balance alone.
-- ARGV[7] bucket (create only): the minute bucket, debit.lua's "min" field, or "" for none
-- ARGV[8] recharge threshold ("rth") while auto-recharge is on, else ""
-- ARGV[9] open recharge trigger seq ("rq"), else ""   ARGV[10] pinned hold reason ("hr"), else ""
-- ARGV[11] credit ids the ledger already has but Redis may not have been told of (payments
--   settled in PostgreSQL, not yet credited), "," separated: remembered as applied in KEYS[2],
--   so finishing them later does not credit them a second time on top of the rebuilt balance
-- ARGV[12] (create only) the plan's concurrent-call limit ("mc"): a whole number, "0" (or "")
--   for no limit. The count of live calls ("lc") is left to reserve.lua, which counts them
--   where it finds none (lib/calls.lua).
--
-- Reply: 1 if written, 0 if left as it was.
local mode = ARGV[6]
if mode == 'create' then
  local max_calls = ARGV[12] or ''
  if max_calls ~= '' and (#max_calls > 9 or not string.match(max_calls, '^%d+$')) then
    return redis.error_reply('ERR load_account: max_calls must be a whole number >= 0')
  end
  if redis.call('EXISTS', KEYS[1]) == 1 then
    return 0
  end
  redis.call('HSET', KEYS[1], 'bal', ARGV[1], 'res', 0, 'cl', ARGV[2], 'lowth', ARGV[3],
    'st', ARGV[4], 'seq', ARGV[5])
  if ARGV[7] and ARGV[7] ~= '' then
    redis.call('HSET', KEYS[1], 'min', ARGV[7])
  end
  for i, field in ipairs({'rth', 'rq', 'hr'}) do
    local v = ARGV[7 + i]
    if v and v ~= '' then
      redis.call('HSET', KEYS[1], field, v)
    end
  end
  for id in string.gmatch(ARGV[11] or '', '[^,]+') do
    redis.call('HSET', KEYS[2], id, 0)
  end
  if max_calls ~= '' and tonumber(max_calls) > 0 then
    redis.call('HSET', KEYS[1], 'mc', string.format('%d', tonumber(max_calls)))
  end
  return 1
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'cl', ARGV[2], 'lowth', ARGV[3])
return 1
