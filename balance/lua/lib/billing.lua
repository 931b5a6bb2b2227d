-- Billing as rating/rating.py does it, in micro-units, always rounding up.
local function billed(d, initial, subsequent)
  if d <= 0 then
    return 0
  end
  if d <= initial then
    return initial
  end
  return initial + math.ceil((d - initial) / subsequent) * subsequent
end

-- What covering a call for d seconds holds, drawn as debit.lua will charge it: free seconds of
-- the minute bucket first, money for the rest, the connect fee always. Returns (micro-units,
-- seconds).
local function hold(d, free_s, rate, fee, initial, subsequent)
  local b = billed(d, initial, subsequent)
  if b == 0 then
    return 0, 0
  end
  local s = math.min(free_s, b)
  return fee + math.ceil(rate * (b - s) / 60), s
end

-- The longest duration (whole increments) that free_s seconds of the bucket and avail
-- micro-units pay for together; 0 if not even the first increment.
local function affordable(avail, free_s, rate, fee, initial, subsequent, max_s)
  local budget = avail - fee
  if budget < 0 then
    return 0
  end
  if rate == 0 then
    return max_s
  end
  local b = free_s + math.floor(budget * 60 / rate)
  if b < initial then
    return 0
  end
  local d = initial + math.floor((b - initial) / subsequent) * subsequent
  if d > max_s then
    d = max_s
  end
  return d
end
