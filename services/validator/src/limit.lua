-- One rate-limit decision, atomically, in one round trip. Mirrors window.rs (read it for why the bound is exact).
--
-- KEYS: the window counters (hashes: bucket index -> units), then the monthly quota counter if ARGV says so.
-- ARGV: windows, cost, buckets per window, has_quota, then per window: limit, bucket_us, shadow (0/1),
--       then if has_quota: quota limit, quota shadow.
-- Returns: { now_us, denied (0/1), per window: used, fits (0/1), at_us (-1 = none), then if has_quota: used, fits }.
-- A denied request (an enforced limit that does not fit) changes no count. A shadow limit that does not fit is
-- reported but does not deny, and is not counted.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local per_window = tonumber(ARGV[3])
local has_quota = tonumber(ARGV[4]) == 1

local out = { now, 0 }
local denied = false
local plans = {}
for i = 1, n do
  local limit = tonumber(ARGV[2 + 3 * i])
  local width = tonumber(ARGV[3 + 3 * i])
  local shadow = tonumber(ARGV[4 + 3 * i]) == 1
  local length = width * per_window
  local current = math.floor(now / width)
  local first = current - per_window
  local flat = redis.call('HGETALL', KEYS[i])
  local buckets = {}
  local stale = {}
  local used = 0
  local oldest = nil
  local newest = current
  for j = 1, #flat, 2 do
    local b = tonumber(flat[j])
    if b < first then
      stale[#stale + 1] = flat[j]
    else
      local c = tonumber(flat[j + 1])
      buckets[#buckets + 1] = { b, c }
      used = used + c
      if oldest == nil or b < oldest then oldest = b end
      if b > newest then newest = b end
    end
  end
  if #stale > 0 then
    redis.call('HDEL', KEYS[i], unpack(stale))
  end
  local fits = used + cost <= limit
  local at = -1
  if fits then
    if oldest ~= nil then at = (oldest + 1) * width + length end
  elseif cost <= limit then
    -- Only a denial needs the buckets in order: when have enough of the oldest left?
    table.sort(buckets, function(a, b) return a[1] < b[1] end)
    local left = used
    for j = 1, #buckets do
      left = left - buckets[j][2]
      if left + cost <= limit then
        at = (buckets[j][1] + 1) * width + length
        break
      end
    end
  end
  if not fits and not shadow then denied = true end
  -- Redis time may step back a little: then count in the newest bucket, which only delays the units' exit.
  plans[i] = { fits = fits, target = newest, width = width, length = length }
  out[#out + 1] = used
  out[#out + 1] = fits and 1 or 0
  out[#out + 1] = at
end

if has_quota then
  local limit = tonumber(ARGV[5 + 3 * n])
  local shadow = tonumber(ARGV[6 + 3 * n]) == 1
  local used = tonumber(redis.call('GET', KEYS[n + 1]) or '0') or 0
  local fits = used + cost <= limit
  if not fits and not shadow then denied = true end
  out[#out + 1] = used
  out[#out + 1] = fits and 1 or 0
end

if denied then
  out[2] = 1
  return out
end
for i = 1, n do
  local p = plans[i]
  if p.fits then
    redis.call('HINCRBY', KEYS[i], string.format('%d', p.target), cost)
    redis.call('PEXPIRE', KEYS[i], math.ceil((p.length + p.width) / 1000) + 1)
  end
end
return out
