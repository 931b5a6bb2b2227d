-- Apply a batch of debits to one or more accounts, idempotently, and decide state changes.
--
-- KEYS: the account hash of each account (balance/keys.py account). The script also uses the
--   account's applied-events hashes (keys.applied: one per UTC day of the events' own time),
--   its reservations and its outbox, derived from the account key by lib/keys.lua: they share
--   its hash tag, hence its slot, so this is safe on a Redis Cluster as long as one call
--   carries one slot's accounts. (Passing them in KEYS instead would cost the hot path two
--   keys per account and one per account and day, each built in Python and mapped back here.)
-- ARGV[1] now      unix seconds
-- ARGV[2] keep_s   how long past its day an applied-events hash is kept (>= the dedup window)
-- ARGV[3] events   one binary record per event, accounts in KEYS order (struct format EVENT
--                  below, big-endian): event_key (16 raw bytes, the hash of (source, id)),
--                  fingerprint (8 raw bytes, the hash of the content: same key with another
--                  fingerprint is a conflict), amount (micro-units to debit, >= 0), day (the UTC
--                  day number of the event's time), then the call's draw on included minutes:
--                  billed_s (-1: none, the amount is final), rate_per_min, connect_fee,
--                  answered_at; last the call_id whose reservation the charge closes (length
--                  then bytes, empty for none): a newly applied hangup releases what its call
--                  still held in its reservations hash (the charge replaces the reservation)
-- ARGV[4] accounts one binary record per account, KEYS order (struct format ACCOUNT): the
--                  number of its events, then its plan for the current period: included_s
--                  (0: no plan), period_start, period_end, then previous_start (0: none), the
--                  start of the period before (it ends at period_start)
--
-- Every value travels in a fixed-width field or behind its length: no value, whatever its
-- bytes or sign, can shift another's meaning (a separator-joined list once let one event's
-- negative day move the amounts of the other accounts in the same call).
--
-- Minute bucket (see rating/plans.py): the account hash's "min" field holds grants
-- "id,remaining_s,valid_from,expires_at" joined by ";". A new call draws its billed seconds
-- from the grants valid at its answered_at, soonest to expire first; its amount becomes
-- connect_fee + ceil(rate_per_min * (billed_s - drawn) / 60). The drawn seconds are stored in
-- the event's memory with its amount, so a duplicate draws nothing and reports the same, and
-- after them "|" and the grants they came from, "id,take,valid_from,expires_at" joined by ";"
-- (undraw.lua gives each take back to its grant when a compensation undoes the event). The
-- plan's grant for the period ("p" .. period_start) is created at the period's first event;
-- the bucket is read by the HMGET every account already costs, and written once. A call
-- answered in the period before and ended in this one draws on that period's allowance: its
-- grant ("p" .. previous_start) is created too when no charge of that period created it,
-- while a grant of that period is still kept (a day past its end, see below: once it is
-- dropped it is never created again, so a period's allowance is never given twice).
--
-- An event's memory lives in the hash of its own day, so a redelivery finds it with one HGET
-- for as long as keep_s after that day; hashes written for late events live at least a day
-- from now, so a crash between this script and the ledger write is always repaired.
--
-- What it costs Redis (measured with callgrind, docs/design/hot-path.md): a redis.call is a few
-- thousand instructions, the account's HMGET of 12 fields about 28,000, so commands are what
-- the script saves. A new event is one HSETNX, which writes its memory and tells whether it was
-- new at once (a duplicate then reads it back: HGET); the account's own fields (balance,
-- reserved, status, bucket, the expiry day "xd") are written by one HSET at the end; an account
-- with several hangups asks once whether it has reservations (EXISTS) before one HGET each.
--
-- Reply: one string, a line per account in KEYS order ("\n" between lines), each line
--   "found\tbalance\tstatus\tcodes\tdup_amounts\toutbox\tdraws\tsettled" (a flat string:
--   building and parsing a nested reply per account cost more than the debits themselves)
--   found        0 when the account hash does not exist (nothing was applied for it)
--   codes        one character per event: "n" newly applied, "d" duplicate (already applied
--                with the same fingerprint), "c" conflict (already applied with another one)
--   dup_amounts  for each "d", the amount that was applied the first time, comma separated
--   outbox       signals queued and not yet acknowledged ("seq|type|reason"), oldest first,
--                ";" separated; read only when the account's seq is ahead of its acked seq
--   draws        for each event (new or duplicate) that drew included seconds,
--                "index:amount:drawn_s" (index within the account's events, from 0), "," separated
--   settled      for each hangup (new or duplicate) that settled a provisional charge (the
--                sweep's, release.lua), "index:charged:charged_at", "," separated
--
-- Provisional charges: a hangup whose reservation the sweep charged provisionally finds the
-- marker ("...|p<charged>|<charged_at>") with the HGET every call's hangup already costs; it is
-- debited its amount less what the sweep charged (a negative difference gives the excess
-- back), and its memory keeps "#charged:charged_at" at its end, so a duplicate reports the
-- same settlement and the ledger can always write both rows.
--
-- Concurrent calls: a hangup that closes a live reservation frees the call's slot ("lc" less
-- one, lib/calls.lua); one that finds a marker (a replay under another event id, a call the
-- sweep closed) frees nothing more.

--#include lib/keys.lua
--#include lib/state.lua
--#include lib/outbox.lua
--#include lib/recharge.lua
--#include lib/calls.lua

local EVENT = '>c16c8i8i4i4i8i8i8I2c0'
local ACCOUNT = '>I4i8i8i8i8'
local now = tonumber(ARGV[1])
local keep_s = tonumber(ARGV[2])
local blob = ARGV[3]
local heads = ARGV[4]
-- Decode everything before writing anything: a malformed argument fails the call while it has
-- changed nothing (Redis does not roll back a script's writes on error).
local ev_key, ev_fp, amounts, days, calls, draws_in = {}, {}, {}, {}, {}, {}
local pos = 1
local n = 0
while pos <= #blob do
  local key, fp, amount, day, billed, rate, fee, at, call
  key, fp, amount, day, billed, rate, fee, at, call, pos = struct.unpack(EVENT, blob, pos)
  if amount < 0 then
    return redis.error_reply('ERR debit: negative amount')
  end
  n = n + 1
  ev_key[n], ev_fp[n], amounts[n], days[n], calls[n] = key, fp, amount, day, call
  if billed >= 0 then
    draws_in[n] = {billed, rate, fee, at}
  end
end
local n_accounts = #heads / 36
if n_accounts ~= #KEYS then
  return redis.error_reply('ERR debit: accounts do not match KEYS')
end
local acc_n, acc_plan = {}, {}
local total_events = 0
pos = 1
for a = 1, n_accounts do
  local ne, p_s, p_from, p_to, p_prev
  ne, p_s, p_from, p_to, p_prev, pos = struct.unpack(ACCOUNT, heads, pos)
  acc_n[a] = ne
  total_events = total_events + ne
  if p_s > 0 then
    if p_from >= p_to or p_prev < 0 or p_prev >= p_from then
      return redis.error_reply('ERR debit: a plan period must end after it starts')
    end
    acc_plan[a] = {p_s, p_from, p_to, p_prev}
  end
end
if total_events ~= n then
  return redis.error_reply('ERR debit: event counts do not match the events')
end
local reply = {}
local ei = 0 -- events consumed so far, over all accounts
local min_expiry = now + 86400
local today = math.floor(now / 86400)
local EXACT = 9007199254740992 -- 2^53: Lua numbers are doubles, exact below it

-- An integer field moved by delta, written with the account's other fields (one HSET): exact
-- while both values stay below 2^53 (micro-units: 9 billion units); past it, HINCRBY.
local function moved(acct, name, value, delta, sets)
  local v = value - delta
  if math.abs(value) < EXACT and math.abs(v) < EXACT then
    sets[#sets + 1] = name
    sets[#sets + 1] = string.format('%d', v)
    return v
  end
  return tonumber(redis.call('HINCRBY', acct, name, string.format('%d', -delta)))
end

for a = 1, n_accounts do
  local n_events = acc_n[a]
  local acct = KEYS[a]
  local plan = acc_plan[a]
  local f = redis.call('HMGET', acct, 'bal', 'res', 'cl', 'lowth', 'st', 'seq', 'ack', 'xd', 'min',
    'rth', 'rq', 'hr')
  if not f[1] then
    ei = ei + n_events
    reply[a] = '0\t0\t\t\t\t\t\t'
  else
    local codes = {}
    local dups, draws, settled -- created at their first entry: most accounts have none
    -- The bucket is parsed only for accounts that have one or a plan: the rest pay nothing.
    local grants = nil
    local dirty = false
    if f[9] or plan then
      grants = {}
      for id, rem, from, to in string.gmatch(f[9] or '', '([^,;]+),(%d+),(%d+),(%d+)') do
        grants[#grants + 1] = {id, tonumber(rem), tonumber(from), tonumber(to)}
      end
      if plan then
        local p_s, p_from, p_to, p_prev = plan[1], plan[2], plan[3], plan[4]
        local pid = string.format('p%d', p_from)
        -- the period before: only while its grant would still be kept (see the drop below)
        local prev = p_prev > 0 and p_from + 86400 > now and string.format('p%d', p_prev)
        local have, have_prev = false, false
        for _, g in ipairs(grants) do
          if g[1] == pid then
            have = true
          elseif g[1] == prev then
            have_prev = true
          end
        end
        if not have then
          grants[#grants + 1] = {pid, p_s, p_from, p_to}
          dirty = true
        end
        if prev and not have_prev then
          -- created only if a call of that period draws from it (g[5]: not yet)
          grants[#grants + 1] = {prev, p_s, p_prev, p_from, true}
        end
      end
      table.sort(grants, function(x, y) return x[4] < y[4] end)
    end
    local total = 0
    local touched = {}
    local released = 0
    local closed = 0 -- live calls this account's hangups close
    local rsv = acct .. RESERVATIONS_SUFFIX
    local applied = acct .. APPLIED_SUFFIX
    local outbox_key = acct .. OUTBOX_SUFFIX
    -- An account with several hangups asks once whether it has reservations at all, instead
    -- of once per hangup (one hangup: its own HGET asks).
    local hangups = 0
    for e = 1, n_events do
      if calls[ei + e] ~= '' then
        hangups = hangups + 1
      end
    end
    local has_rsv = hangups < 2 or redis.call('EXISTS', rsv) == 1
    local bucket, last_day = nil, nil
    for e = 1, n_events do
      local i = ei + e
      local key = ev_key[i]
      local fp = ev_fp[i]
      local amount = amounts[i]
      local day = days[i]
      if day ~= last_day then
        bucket, last_day = applied .. string.format('%d', day), day
      end
      -- What the event writes if it is new, read and computed first (its draw on the grants
      -- is given back if it is not): one HSETNX then both writes its memory and tells whether
      -- it was new (a second copy later in this batch finds it, as a redelivery does).
      local drawn = 0
      local took = nil
      local ent = grants and draws_in[i]
      if ent then
        local need, rate, fee, at = ent[1], ent[2], ent[3], ent[4]
        for _, g in ipairs(grants) do
          if need == 0 then
            break
          end
          if g[2] > 0 and g[3] <= at and at < g[4] then
            local take = math.min(g[2], need)
            g[2] = g[2] - take
            need = need - take
            drawn = drawn + take
            took = took or {}
            took[#took + 1] = {g, take}
          end
        end
        if drawn > 0 then
          -- the overage, rounded up as rating/rating.py does: exact, as rate * need
          -- stays far below 2^53 (rates are capped at MAX_RATE_PER_MIN)
          local x = rate * need + 59
          amount = fee + (x - x % 60) / 60
        end
      end
      local call = calls[i]
      local held = nil
      if call ~= '' and has_rsv then
        held = redis.call('HGET', rsv, call)
      end
      local charged, charged_at = nil, nil
      if held then
        charged, charged_at = string.match(held, '|p(%d+)|(%d+)$')
      end
      local amount_s = string.format('%d', amount)
      local memory = amount_s .. '|' .. fp
      if drawn > 0 then
        local from = {}
        for t, tk in ipairs(took) do
          local g = tk[1]
          from[t] = string.format('%s,%d,%d,%d', g[1], tk[2], g[3], g[4])
        end
        memory = memory .. string.format('%d', drawn) .. '|' .. table.concat(from, ';')
      end
      if charged then
        memory = memory .. '#' .. charged .. ':' .. charged_at
      end
      if redis.call('HSETNX', bucket, key, memory) == 1 then
        codes[e] = 'n'
        if drawn > 0 then
          for _, tk in ipairs(took) do
            tk[1][5] = nil -- a grant this event drew from is created (the period before's)
          end
          dirty = true
          draws = draws or {}
          draws[#draws + 1] = (e - 1) .. ':' .. amount_s .. ':' .. drawn
        end
        if held then
          if is_live(held) then
            closed = closed + 1
          end
          -- Keep a closed marker for a day (terminate_at -1): a late or replayed
          -- call.answered / call.progress must not open the call again. The sweep drops it.
          redis.call('HSET', rsv, call, string.format('0|0|%d|0|0|1|1|0|-1', now + 86400))
          released = released + tonumber(string.match(held, '^(%d+)|'))
          if charged then
            total = total - tonumber(charged)
            settled = settled or {}
            settled[#settled + 1] = (e - 1) .. ':' .. charged .. ':' .. charged_at
          end
        end
        total = total + amount
        touched[bucket] = day
      else
        if took then
          for _, tk in ipairs(took) do
            tk[1][2] = tk[1][2] + tk[2]
          end
        end
        -- "amount|fp" then the seconds drawn and "|" the grants they came from, if any (fp is 8
        -- raw bytes: cut by position)
        local prior = redis.call('HGET', bucket, key)
        local sep = string.find(prior, '|', 1, true)
        if string.sub(prior, sep + 1, sep + 8) == fp then
          codes[e] = 'd'
          local first = string.sub(prior, 1, sep - 1)
          dups = dups or {}
          dups[#dups + 1] = first
          local was_drawn = string.match(string.sub(prior, sep + 9), '^%d*')
          if was_drawn ~= '' then
            draws = draws or {}
            draws[#draws + 1] = (e - 1) .. ':' .. first .. ':' .. was_drawn
          end
          if call ~= '' then
            local p_charged, p_at = string.match(string.sub(prior, sep + 9), '#(%d+):(%d+)$')
            if p_charged then
              settled = settled or {}
              settled[#settled + 1] = (e - 1) .. ':' .. p_charged .. ':' .. p_at
            end
          end
        else
          codes[e] = 'c'
        end
      end
    end
    ei = ei + n_events
    -- The account's own fields are written by one HSET at the end (balance, reserved, status,
    -- bucket, the expiry day), not a command each.
    local sets = {}
    if dirty then
      -- Drop grants a day past their end (late calls of the period still find them) and
      -- spent bundles; a spent plan grant stays until then, so the period is not refilled.
      local keep = {}
      for _, g in ipairs(grants) do
        if g[4] + 86400 > now and not g[5] and (g[2] > 0 or string.sub(g[1], 1, 1) == 'p') then
          keep[#keep + 1] = string.format('%s,%d,%d,%d', g[1], g[2], g[3], g[4])
        end
      end
      if #keep > 0 then
        sets[#sets + 1] = 'min'
        sets[#sets + 1] = table.concat(keep, ';')
      else
        redis.call('HDEL', acct, 'min')
      end
    end
    for b, day in pairs(touched) do
      local want = (day + 1) * 86400 + keep_s
      if day == today then
        -- Today's bucket always gets the same expiry: set it once a day, remembered in the
        -- account's "xd" field, instead of two more calls per account per batch.
        if tonumber(f[8] or '-1') ~= today then
          redis.call('EXPIRE', b, want - now)
          sets[#sets + 1] = 'xd'
          sets[#sets + 1] = string.format('%d', today)
        end
      else
        if want < min_expiry then
          want = min_expiry
        end
        -- Only ever lengthen a bucket's life (TTL is -1 for a new hash). Expiry is relative to
        -- the caller's clock (ARGV[1]), never Redis's own: EXPIRE by want - now, not EXPIREAT.
        local ttl = redis.call('TTL', b)
        if ttl < 0 or now + ttl < want then
          redis.call('EXPIRE', b, want - now)
        end
      end
    end
    local bal = tonumber(f[1])
    if total ~= 0 then
      -- never by 0: Lua formats -0 as "-0", which Redis refuses as an integer. (total < 0:
      -- a late hangup gives back the excess of a provisional charge.)
      bal = moved(acct, 'bal', bal, total, sets)
    end
    local res = tonumber(f[2] or '0')
    if released > 0 then
      res = moved(acct, 'res', res, released, sets)
    end
    local avail = bal + tonumber(f[3] or '0') - res
    local secs = 0
    if grants then
      for _, g in ipairs(grants) do
        if g[3] <= now and now < g[4] then
          secs = secs + g[2]
        end
      end
    end
    local st, signal = transition(f[5] or 'active', avail, tonumber(f[4] or '0'), f[12], secs)
    if st ~= f[5] then
      sets[#sets + 1] = 'st'
      sets[#sets + 1] = st
    end
    if #sets > 0 then
      redis.call('HSET', acct, unpack(sets))
    end
    calls_closed(acct, closed)
    local seq = tonumber(f[6] or '0')
    if signal then
      seq = queue_signal(acct, outbox_key, signal)
    end
    seq = recharge_trigger(acct, outbox_key, avail, f[10], f[11]) or seq
    local outbox = ''
    if seq > tonumber(f[7] or '0') then
      outbox = table.concat(redis.call('LRANGE', outbox_key, 0, -1), ';')
    end
    reply[a] = '1\t' .. string.format('%d', bal) .. '\t' .. st .. '\t' .. table.concat(codes)
      .. '\t' .. (dups and table.concat(dups, ',') or '') .. '\t' .. outbox .. '\t'
      .. (draws and table.concat(draws, ',') or '') .. '\t'
      .. (settled and table.concat(settled, ',') or '')
  end
end
return table.concat(reply, '\n')
