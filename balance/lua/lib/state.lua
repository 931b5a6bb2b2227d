-- The account state machine, shared by every script that moves money. Returns the new status
-- and the signal to queue, if any.
-- pinned: the account is held for a reason its credit does not explain ("hr", e.g.
-- recharge_cap): only an operator's resume or a payment lifts it. secs: the seconds of the
-- minute bucket usable now (usable_seconds() in lib/bucket.lua): money exhausted with minutes
-- left is low, not hold.
local function transition(st, avail, lowth, pinned, secs)
  if st == 'suspended' or pinned then
    return st, nil
  end
  local target = 'active'
  if avail <= 0 and secs <= 0 then
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
