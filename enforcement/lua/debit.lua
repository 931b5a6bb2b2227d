-- Apply a batch of debits to one or more accounts, idempotently, and decide state changes.
--
-- KEYS, 5 per account, in order: account hash, applied-events hash of today, of yesterday, of
--   the day before, outbox list (see enforcement/keys.py; all share the account's hash tag).
-- ARGV[1] expire_at   unix seconds at which today's applied-events hash may be dropped
-- ARGV[2] n_accounts
-- then per account: n_events, followed by n_events triples (event_key, fingerprint, amount)
--   event_key    16 raw bytes, the hash of (source, id)
--   fingerprint  the hash of the event's content: same key + other fingerprint is a conflict
--   amount       micro-units to debit (>= 0)
--
-- Reply: one entry per account: {found, balance, status, codes, dup_amounts, outbox}
--   found        0 when the account hash does not exist (nothing was applied for it)
--   codes        one character per event: "n" newly applied, "d" duplicate (already applied
--                with the same fingerprint), "c" conflict (already applied with another one)
--   dup_amounts  for each "d", the amount that was applied the first time, as a string
--   outbox       every signal still pending for the account, oldest first ("seq|type|reason")
-- The account state machine, shared by every script that moves money (keep the copies equal;
-- tests/test_balance.py checks they are). Returns the new status and the signal to queue, if any.
local function transition(st, avail, lowth)
  if st == 'suspended' then
    return st, nil
  end
  local target = 'active'
  if avail <= 0 then
    target = 'hold'
  elseif avail <= lowth then
    target = 'low'
  end
  if target == st then
    return st, nil
  elseif target == 'hold' then
    return target, 'account.hold|credit_exhausted'
  elseif st == 'hold' then
    return target, 'account.resume|credit_available'
  elseif target == 'low' then
    return target, 'account.low_balance|below_threshold'
  end
  return target, nil
end

local expire_at = tonumber(ARGV[1])
local n_accounts = tonumber(ARGV[2])
local reply = {}
local argi = 3

for a = 1, n_accounts do
  local k = (a - 1) * 5
  local acct, ev0, ev1, ev2, out = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]
  local n_events = tonumber(ARGV[argi])
  argi = argi + 1
  if redis.call('EXISTS', acct) == 0 then
    argi = argi + 3 * n_events
    reply[a] = {0, 0, '', '', {}, {}}
  else
    local codes = {}
    local dups = {}
    local total = 0
    local n_fresh = 0
    for e = 1, n_events do
      local key, fp, amount = ARGV[argi], ARGV[argi + 1], ARGV[argi + 2]
      argi = argi + 3
      local prior = redis.call('HGET', ev0, key) or redis.call('HGET', ev1, key)
        or redis.call('HGET', ev2, key)
      if prior then
        local sep = string.find(prior, '|', 1, true)
        if string.sub(prior, sep + 1) == fp then
          codes[e] = 'd'
          dups[#dups + 1] = string.sub(prior, 1, sep - 1)
        else
          codes[e] = 'c'
        end
      else
        codes[e] = 'n'
        n_fresh = n_fresh + 1
        -- written at once, so a second copy of the event later in this batch is a duplicate
        redis.call('HSET', ev0, key, amount .. '|' .. fp)
        total = total + tonumber(amount)
      end
    end
    if n_fresh > 0 then
      redis.call('EXPIREAT', ev0, expire_at)
    end
    -- Never HINCRBY by 0: Lua formats -0 as "-0", which Redis refuses as an integer.
    local bal
    if total > 0 then
      -- %d, not tostring: Lua prints numbers past 14 digits in exponent form.
      bal = tonumber(redis.call('HINCRBY', acct, 'bal', string.format('%d', -total)))
    else
      bal = tonumber(redis.call('HGET', acct, 'bal'))
    end
    local f = redis.call('HMGET', acct, 'res', 'cl', 'lowth', 'st')
    local avail = bal + tonumber(f[2] or '0') - tonumber(f[1] or '0')
    local st, signal = transition(f[4] or 'active', avail, tonumber(f[3] or '0'))
    if st ~= f[4] then
      redis.call('HSET', acct, 'st', st)
    end
    if signal then
      local seq = redis.call('HINCRBY', acct, 'seq', 1)
      redis.call('RPUSH', out, seq .. '|' .. signal)
    end
    reply[a] = {1, bal, st, table.concat(codes), dups, redis.call('LRANGE', out, 0, -1)}
  end
end
return reply
