-- Rate-limit decisions, atomically, in one round trip: every decision of a batch of concurrent requests, in
-- order, each one all-or-nothing and seeing the counts of those before it. The arithmetic is window.rs's (read it
-- for why the bound is exact); the storage keeps a running total so that a decision costs a few field reads, not
-- one per bucket.
--
-- KEYS: per decision, its window counters (hashes: bucket index -> units, plus 't' = their total, 'o' = the
--       oldest bucket and 'e' = the bucket when the expiry was set), then its monthly quota counter if it has one.
-- ARGV: buckets per window, number of decisions, then per decision: windows, cost, has_quota (0/1), then per
--       window: limit, bucket_us, shadow (0/1), then if has_quota: quota limit, quota shadow (0/1).
-- Returns: { now_us, then per decision: denied (0/1), per window: used, fits (0/1), at_us (-1 = none), then if
--          has_quota: used, fits }.
-- A denied request (an enforced limit that does not fit) changes no count. A shadow limit that does not fit is
-- reported but does not deny, and is not counted.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local per_window = tonumber(ARGV[1])
local decisions = tonumber(ARGV[2])

local function field(b) return string.format('%d', b) end

-- The fields of buckets a..b.
local function fields(a, b)
  local r = {}
  for x = a, b do r[#r + 1] = field(x) end
  return r
end

-- Where one window counter stands at `now`, dropping the buckets that have left the window. Returns the units
-- counted, whether `cost` more fits, when (see window.rs), and what `count` needs.
local function check(key, limit, width, cost)
  local length = width * per_window
  local current = math.floor(now / width)
  local first = current - per_window
  local function exit_at(b) return (b + 1) * width + length end
  -- 't' is the units in the stored buckets, 'o' the oldest stored bucket, 'e' the bucket at which the expiry was
  -- last set: a check reads these and the current bucket in one call, and only touches other buckets when the
  -- oldest one has left the window (at most once per bucket width).
  local head = redis.call('HMGET', key, 't', 'o', 'e', field(current))
  local used = tonumber(head[1]) or 0
  local oldest = tonumber(head[2])
  local expiry = tonumber(head[3])
  local in_current = tonumber(head[4]) or 0
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
      used, expiry, in_current = 0, nil, 0
    else
      redis.call('HSET', key, 't', used, 'o', field(oldest))
    end
  end
  if oldest == nil and used ~= 0 then
    -- A total without buckets cannot happen; if it ever does, start afresh rather than count wrongly forever.
    redis.call('DEL', key)
    used, expiry, in_current = 0, nil, 0
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
  -- Redis time may step back a little: never count before the oldest stored bucket.
  local target = current
  if oldest ~= nil and oldest > target then
    target = oldest
    in_current = tonumber(redis.call('HGET', key, field(target))) or 0
  end
  return used, fits, at, {
    used = used, target = target, in_target = in_current, fresh = oldest == nil, expiry = expiry, length = length,
    width = width,
  }
end

-- Counts `cost` in the target bucket, in one write. The key must outlive its newest bucket's time in the window
-- (at most a window and a bucket from now): its expiry is set to twice that, and so needs moving only once per
-- window length, not at every new bucket.
local function count(key, plan, cost)
  local update = { 't', plan.used + cost, field(plan.target), plan.in_target + cost }
  if plan.fresh then
    update[#update + 1] = 'o'
    update[#update + 1] = field(plan.target)
  end
  local refresh = plan.expiry == nil or plan.target - plan.expiry >= per_window
  if refresh then
    update[#update + 1] = 'e'
    update[#update + 1] = field(plan.target)
  end
  redis.call('HSET', key, unpack(update))
  if refresh then
    redis.call('PEXPIRE', key, 2 * math.ceil((plan.length + plan.width) / 1000) + 1)
  end
end

local out = { now }
local k = 0 -- KEYS consumed by earlier decisions
local a = 2 -- ARGV consumed by earlier decisions
for _ = 1, decisions do
  local n = tonumber(ARGV[a + 1])
  local cost = tonumber(ARGV[a + 2])
  local has_quota = tonumber(ARGV[a + 3]) == 1
  a = a + 3
  local denied_at = #out + 1
  out[denied_at] = 0
  local denied = false
  local plans = {}
  for i = 1, n do
    local limit = tonumber(ARGV[a + 1])
    local shadow = tonumber(ARGV[a + 3]) == 1
    local used, fits, at, plan = check(KEYS[k + i], limit, tonumber(ARGV[a + 2]), cost)
    a = a + 3
    if not fits and not shadow then denied = true end
    if fits then plans[i] = plan end
    out[#out + 1] = used
    out[#out + 1] = fits and 1 or 0
    out[#out + 1] = at
  end
  if has_quota then
    local limit = tonumber(ARGV[a + 1])
    local shadow = tonumber(ARGV[a + 2]) == 1
    a = a + 2
    local used = tonumber(redis.call('GET', KEYS[k + n + 1]) or '0') or 0
    local fits = used + cost <= limit
    if not fits and not shadow then denied = true end
    out[#out + 1] = used
    out[#out + 1] = fits and 1 or 0
  end
  if denied then
    out[denied_at] = 1
  else
    for i = 1, n do
      if plans[i] then count(KEYS[k + i], plans[i], cost) end
    end
  end
  k = k + n + (has_quota and 1 or 0)
end
return out
