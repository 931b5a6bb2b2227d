-- Apply a batch of debits to one or more accounts, idempotently, and decide state changes.
--
-- KEYS: the account hash of each account ("{a:ID}"). The script also uses the account's
--   applied-events hashes ("{a:ID}:ev:DAY", one per UTC day of the events' own time) and its
--   outbox ("{a:ID}:out"), derived from the account key: they share its hash tag, hence its
--   slot, so this is safe on a Redis Cluster as long as one call carries one slot's accounts.
-- ARGV[1] now      unix seconds
-- ARGV[2] keep_s   how long past its day an applied-events hash is kept (>= the dedup window)
-- ARGV[3] events   24 bytes per event, accounts in KEYS order: event_key (16 raw bytes, the
--                  hash of (source, id)) then fingerprint (8 raw bytes, the hash of the
--                  content: same key with another fingerprint is a conflict)
-- ARGV[4] amounts  per event "amount day": micro-units to debit (>= 0) and the UTC day number
--                  of the event's time, space separated, same order
-- ARGV[5] counts   number of events per account, space separated, KEYS order
-- ARGV[6] calls    per event, the call_id whose reservation the charge closes ("" for none),
--                  "\n" separated, same order: a newly applied hangup releases what its
--                  call still held in "{a:ID}:rsv" (the charge replaces the reservation)
--
-- An event's memory lives in the hash of its own day, so a redelivery finds it with one HGET
-- for as long as keep_s after that day; hashes written for late events live at least a day
-- from now, so a crash between this script and the ledger write is always repaired.
--
-- Reply: one string, a line per account in KEYS order ("\n" between lines), each line
--   "found\tbalance\tstatus\tcodes\tdup_amounts\toutbox" (a flat string: building and
--   parsing a nested reply per account cost more than the debits themselves)
--   found        0 when the account hash does not exist (nothing was applied for it)
--   codes        one character per event: "n" newly applied, "d" duplicate (already applied
--                with the same fingerprint), "c" conflict (already applied with another one)
--   dup_amounts  for each "d", the amount that was applied the first time, comma separated
--   outbox       signals queued and not yet acknowledged ("seq|type|reason"), oldest first,
--                ";" separated; read only when the account's seq is ahead of its acked seq

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

local now = tonumber(ARGV[1])
local keep_s = tonumber(ARGV[2])
local blob = ARGV[3]
local amounts = {}
local days = {}
local n = 0
for amount, day in string.gmatch(ARGV[4], '(%d+) (%d+)') do
  n = n + 1
  amounts[n] = amount
  days[n] = day
end
local calls = {}
n = 0
for c in string.gmatch(ARGV[6] .. '\n', '([^\n]*)\n') do
  n = n + 1
  calls[n] = c
end
local reply = {}
local ei = 0 -- events consumed so far, over all accounts
local min_expiry = now + 86400
local today = math.floor(now / 86400)

local a = 0
for c in string.gmatch(ARGV[5], '%d+') do
  a = a + 1
  local n_events = tonumber(c)
  local acct = KEYS[a]
  local f = redis.call('HMGET', acct, 'bal', 'res', 'cl', 'lowth', 'st', 'seq', 'ack', 'xd')
  if not f[1] then
    ei = ei + n_events
    reply[a] = '0\t0\t\t\t\t'
  else
    local codes = {}
    local dups = {}
    local total = 0
    local touched = {}
    local released = 0
    local rsv = acct .. ':rsv'
    for e = 1, n_events do
      local off = (ei + e - 1) * 24
      local key = string.sub(blob, off + 1, off + 16)
      local fp = string.sub(blob, off + 17, off + 24)
      local amount = amounts[ei + e]
      local day = days[ei + e]
      local bucket = acct .. ':ev:' .. day
      local prior = redis.call('HGET', bucket, key)
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
        redis.call('HSET', bucket, key, amount .. '|' .. fp)
        total = total + tonumber(amount)
        touched[bucket] = tonumber(day)
        local call = calls[ei + e]
        if call ~= '' then
          local held = redis.call('HGET', rsv, call)
          if held then
            -- Keep a closed marker for a day (terminate_at -1): a late or replayed
            -- call.answered / call.progress must not open the call again. The sweep drops it.
            redis.call('HSET', rsv, call, string.format('0|0|%d|0|0|1|1|0|-1', now + 86400))
            released = released + tonumber(string.match(held, '^(%d+)|'))
          end
        end
      end
    end
    ei = ei + n_events
    for bucket, day in pairs(touched) do
      local want = (day + 1) * 86400 + keep_s
      if day == today then
        -- Today's bucket always gets the same expiry: set it once a day, remembered in the
        -- account's "xd" field, instead of two more calls per account per batch.
        if tonumber(f[8] or '-1') ~= today then
          redis.call('EXPIREAT', bucket, want)
          redis.call('HSET', acct, 'xd', today)
        end
      else
        if want < min_expiry then
          want = min_expiry
        end
        -- Only ever lengthen a bucket's life (EXPIRETIME is -1 for a new hash).
        if redis.call('EXPIRETIME', bucket) < want then
          redis.call('EXPIREAT', bucket, want)
        end
      end
    end
    local bal = tonumber(f[1])
    if total > 0 then
      -- %d, not tostring: Lua prints numbers past 14 digits in exponent form; and never
      -- HINCRBY by 0: Lua formats -0 as "-0", which Redis refuses as an integer.
      bal = tonumber(redis.call('HINCRBY', acct, 'bal', string.format('%d', -total)))
    end
    local res = tonumber(f[2] or '0')
    if released > 0 then
      res = tonumber(redis.call('HINCRBY', acct, 'res', string.format('%d', -released)))
    end
    local avail = bal + tonumber(f[3] or '0') - res
    local st, signal = transition(f[5] or 'active', avail, tonumber(f[4] or '0'))
    if st ~= f[5] then
      redis.call('HSET', acct, 'st', st)
    end
    local seq = tonumber(f[6] or '0')
    if signal then
      seq = redis.call('HINCRBY', acct, 'seq', 1)
      redis.call('RPUSH', acct .. ':out', seq .. '|' .. signal)
    end
    local outbox = ''
    if seq > tonumber(f[7] or '0') then
      outbox = table.concat(redis.call('LRANGE', acct .. ':out', 0, -1), ';')
    end
    reply[a] = '1\t' .. string.format('%d', bal) .. '\t' .. st .. '\t' .. table.concat(codes)
      .. '\t' .. table.concat(dups, ',') .. '\t' .. outbox
  end
end
return table.concat(reply, '\n')
