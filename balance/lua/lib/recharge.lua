--#include lib/outbox.lua

-- The auto-recharge trigger, shared by the scripts that move money. Edge-triggered: it fires
-- when available credit is at or below the threshold ("rth", present only while auto-recharge
-- is on) and no trigger is open ("rq"); "rq" stays set until the available credit is seen above
-- the threshold again or the recharge worker closes the trigger, so all the events of one
-- crossing fire it once. The request travels in the account's outbox (key `outbox`) like a
-- signal (metering/publish.py routes it to its own topic). Returns its seq.
local function recharge_trigger(acct, outbox, avail, rth, rq)
  if not rth then
    return nil
  end
  if avail > tonumber(rth) then
    if rq then
      redis.call('HDEL', acct, 'rq')
    end
    return nil
  end
  if rq then
    return nil
  end
  local seq = queue_signal(acct, outbox, 'recharge.requested|below_threshold')
  redis.call('HSET', acct, 'rq', seq)
  return seq
end
