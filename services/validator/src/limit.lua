-- One rate-limit decision, atomically, in one round trip. The arithmetic is window.rs's (read it for why the
-- bound is exact); the storage keeps a running total so that a call costs a few field reads, not one per bucket.
--
-- KEYS: the window counters (hashes: bucket index -> units, plus 't' = their total and 'o' = the oldest bucket),
--       then the monthly quota counter if ARGV says so.
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

local function field(b) return string.format('%d', b) end

-- The fields of buckets a..b.
local function fields(a, b)
  local r = {}
  for x = a, b do r[#r + 1] = field(x) end
  return r
end

local out = { now, 0 }
local denied = false
local plans = {}
for i = 1, n do
  local key = KEYS[i]
  local limit = tonumber(ARGV[2 + 3 * i])
  local width = tonumber(ARGV[3 + 3 * i])
  local shadow = tonumber(ARGV[4 + 3 * i]) == 1
  local length = width * per_window
  local current = math.floor(now / width)
  local first = current - per_window
  local function exit_at(b) return (b + 1) * width + length end
  -- 't' is the units in the stored buckets, 'o' the oldest stored bucket: a call reads two fields, and only
  -- touches buckets when the oldest one has left the window (at most once per bucket width).
  local head = redis.call('HMGET', key, 't', 'o')
  local used = tonumber(head[1]) or 0
  local oldest = tonumber(head[2])
  if oldest ~= nil and oldest < first then
    local live = nil
    if first - oldest <= per_window + 1 then
      local stale = fields(oldest, first - 1)
      for _, c in ipairs(redis.call('HMGET', key, unpack(stale))) do
        if c then used = used - tonumber(c) end
      end
      redis.call('HDEL', key, unpack(stale))
      if used > 0 then
        local counts = redis.call('HMGET', key, unpack(fields(first, first + per_window + 1)))
        for j = 1, #counts do
          if counts[j] then
            live = first + j - 1
            break
          end
        end
      end
    end
    oldest = live
    if oldest == nil then
      -- Everything left the window (or the counter was inconsistent): start afresh.
      redis.call('DEL', key)
      used = 0
    else
      redis.call('HSET', key, 't', used, 'o', field(oldest))
    end
  end
  if oldest == nil and used ~= 0 then
    -- A total without buckets cannot happen; if it ever does, start afresh rather than count wrongly forever.
    redis.call('DEL', key)
    used = 0
  end
  local fits = used + cost <= limit
  local at = -1
  if fits then
    if oldest ~= nil then at = exit_at(oldest) end
  elseif cost <= limit and oldest ~= nil then
    -- When have enough of the oldest buckets left? Usually the oldest alone frees enough.
    local c = tonumber(redis.call('HGET', key, field(oldest))) or 0
    if used - c + cost <= limit then
      at = exit_at(oldest)
    else
      local left = used
      local counts = redis.call('HMGET', key, unpack(fields(oldest, oldest + per_window + 1)))
      for j = 1, #counts do
        left = left - (tonumber(counts[j]) or 0)
        if left + cost <= limit then
          at = exit_at(oldest + j - 1)
          break
        end
      end
    end
  end
  if not fits and not shadow then denied = true end
  -- Redis time may step back a little: never count before the oldest stored bucket.
  local target = current
  if oldest ~= nil and oldest > target then target = oldest end
  plans[i] = { fits = fits, target = target, fresh = oldest == nil, width = width, length = length }
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
    redis.call('HINCRBY', KEYS[i], field(p.target), cost)
    redis.call('HINCRBY', KEYS[i], 't', cost)
    if p.fresh then redis.call('HSET', KEYS[i], 'o', field(p.target)) end
    redis.call('PEXPIRE', KEYS[i], math.ceil((p.length + p.width) / 1000) + 1)
  end
end
return out
