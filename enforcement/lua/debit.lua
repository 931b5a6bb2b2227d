-- Apply a batch of debits to one or more accounts, idempotently, and decide state changes.
--
-- KEYS: the account hash of each account ("{a:ID}"). The script also uses the account's
--   applied-events hashes ("{a:ID}:ev:DAY" for today and the two days before) and its outbox
--   ("{a:ID}:out"), derived from the account key: they share its hash tag, hence its slot, so
--   this is safe on a Redis Cluster as long as one call carries the accounts of one slot.
-- ARGV[1] expire_at  unix seconds at which today's applied-events hash may be dropped
-- ARGV[2] day        today's UTC day number (unix seconds // 86400)
-- ARGV[3] events     24 bytes per event, accounts in KEYS order: event_key (16 raw bytes, the
--                    hash of (source, id)) then fingerprint (8 raw bytes, the hash of the
--                    content: same key with another fingerprint is a conflict)
-- ARGV[4] amounts    micro-units to debit per event (>= 0), space separated, same order
-- ARGV[5] counts     number of events per account, space separated, KEYS order
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
local day = tonumber(ARGV[2])
local blob = ARGV[3]
local amounts = {}
for a in string.gmatch(ARGV[4], '%d+') do
  amounts[#amounts + 1] = a
end
local reply = {}
local ei = 0 -- events consumed so far, over all accounts

local a = 0
for c in string.gmatch(ARGV[5], '%d+') do
  a = a + 1
  local n_events = tonumber(c)
  local acct = KEYS[a]
  local out = acct .. ':out'
  local ev0 = acct .. ':ev:' .. day
  local ev1 = acct .. ':ev:' .. (day - 1)
  local ev2 = acct .. ':ev:' .. (day - 2)
  local f = redis.call('HMGET', acct, 'bal', 'res', 'cl', 'lowth', 'st')
  if not f[1] then
    ei = ei + n_events
    reply[a] = {0, 0, '', '', {}, {}}
  else
    local codes = {}
    local dups = {}
    local total = 0
    local fresh = 0
    for e = 1, n_events do
      local off = (ei + e - 1) * 24
      local key = string.sub(blob, off + 1, off + 16)
      local fp = string.sub(blob, off + 17, off + 24)
      local amount = amounts[ei + e]
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
        -- written at once, so a second copy of the event later in this batch is a duplicate
        redis.call('HSET', ev0, key, amount .. '|' .. fp)
        total = total + tonumber(amount)
        fresh = fresh + 1
      end
    end
    ei = ei + n_events
    -- Never HINCRBY by 0: Lua formats -0 as "-0", which Redis refuses as an integer.
    local bal = tonumber(f[1])
    if fresh > 0 then
      redis.call('EXPIREAT', ev0, expire_at)
    end
    if total > 0 then
      -- %d, not tostring: Lua prints numbers past 14 digits in exponent form.
      bal = tonumber(redis.call('HINCRBY', acct, 'bal', string.format('%d', -total)))
    end
    local avail = bal + tonumber(f[3] or '0') - tonumber(f[2] or '0')
    local st, signal = transition(f[5] or 'active', avail, tonumber(f[4] or '0'))
    if st ~= f[5] then
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
