-- Rate-limit decisions, atomically, in one round trip: every decision of a batch of concurrent requests, in
-- order, each one all-or-nothing and seeing the counts of those before it. The arithmetic is window.rs's (read it
-- for why the bound is exact); the storage keeps a running total so that a decision costs a few field reads, not
-- one per bucket.
--
-- KEYS: per decision, its window counters (hashes: bucket index -> units, plus 't' = their total, 'o' = the
--       oldest bucket and 'e' = the bucket when the expiry was set), then its monthly quota counter if it has one.
-- ARGV: buckets per window, number of decisions, then per decision: windows, cost, has_quota (0/1), then per
--       window: limit, bucket_us, shadow (0/1), then if has_quota: quota limit, quota shadow (0/1).
-- Returns: now_us, then per decision: denied (0/1), per window: used, fits (0/1), at_us (-1 = none), then if
--          has_quota: used, fits; packed as little-endian 8-byte integers in one string, which the validator reads
--          far more cheaply than an array of as many integer replies.
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

-- Every counter this call touches, as it stands with the counts this call made: a counter shared by the batch's
-- requests (their organization's) is read once and written once per call, not once per request.
local state = {}

-- Per bucket width, the current bucket and its field name: a batch's counters share a few widths.
local currents = {}
local function current_bucket(width)
  local c = currents[width]
  if c == nil then
    local b = math.floor(now / width)
    c = { b, field(b) }
    currents[width] = c
  end
  return c[1], c[2]
end

-- A counter's state at `now`, read from Redis (dropping the buckets that have left the window) on first use.
local function load(key, width)
  local s = state[key]
  if s then return s end
  local current, current_field = current_bucket(width)
  local first = current - per_window
  -- 't' is the units in the stored buckets, 'o' the oldest stored bucket, 'e' the bucket at which the expiry was
  -- last set: one call reads these and the current bucket, and other buckets are read only when the oldest one has
  -- left the window (at most once per bucket width).
  local head = redis.call('HMGET', key, 't', 'o', 'e', current_field)
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
  -- Redis time may step back a little: never count before the oldest stored bucket.
  local target, target_field = current, current_field
  if oldest ~= nil and oldest > target then
    target, target_field = oldest, field(oldest)
    in_current = tonumber(redis.call('HGET', key, target_field)) or 0
  end
  -- The target bucket's field name is kept, so that it is formatted once per call.
  s = { used = used, oldest = oldest, expiry = expiry, target = target, target_field = target_field,
        in_target = in_current, width = width,
        dirty = false }
  state[key] = s
  return s
end

-- Writes what this call counted, in one call. The key must outlive its newest bucket's time in the window (at
-- most a window and a bucket from now): its expiry is set to twice that, so it moves once per window length.
local function store(key, s)
  if not s.dirty then return end
  s.dirty = false
  local target = s.target_field
  if s.expiry ~= nil and s.target - s.expiry < per_window then
    -- The common case: the oldest bucket is stored already unless this call made it, and the expiry stands.
    if s.oldest == s.target then
      redis.call('HSET', key, 't', s.used, target, s.in_target, 'o', target)
    else
      redis.call('HSET', key, 't', s.used, target, s.in_target)
    end
    return
  end
  redis.call('HSET', key, 't', s.used, target, s.in_target, 'o', field(s.oldest), 'e', target)
  redis.call('PEXPIRE', key, 2 * math.ceil(s.width * (per_window + 1) / 1000) + 1)
  s.expiry = s.target
end

-- When bucket `b` of a window of `width` leaves it.
local function exit_at(b, width) return (b + 1 + per_window) * width end

-- Whether `cost` more fits under `limit`, and when (see window.rs).
local function check(key, limit, width, cost)
  local s = load(key, width)
  local fits = s.used + cost <= limit
  local at = -1
  if fits then
    if s.oldest ~= nil then at = exit_at(s.oldest, width) end
  elseif cost <= limit and s.oldest ~= nil then
    -- When have enough of the oldest buckets left? Usually the oldest alone frees enough. The buckets are read
    -- from Redis, so what this call counted is written first.
    store(key, s)
    local c = tonumber(redis.call('HGET', key, field(s.oldest))) or 0
    if s.used - c + cost <= limit then
      at = exit_at(s.oldest, width)
    else
      local left = s.used
      local counts = redis.call('HMGET', key, unpack(fields(s.oldest, s.oldest + per_window + 1)))
      for j = 1, #counts do
        left = left - (tonumber(counts[j]) or 0)
        if left + cost <= limit then
          at = exit_at(s.oldest + j - 1, width)
          break
        end
      end
    end
  end
  return s.used, fits, at, s
end

-- Counts `cost` in the counter's target bucket (written by `store` at the end of the call).
local function count(s, cost)
  s.used = s.used + cost
  s.in_target = s.in_target + cost
  if s.oldest == nil then s.oldest = s.target end
  s.dirty = true
end

-- A batch's decisions repeat a few numbers (limits, bucket widths, costs): each argument is parsed once per call.
local numbers = {}
local function number(text)
  local v = numbers[text]
  if v == nil then
    v = tonumber(text)
    numbers[text] = v
  end
  return v
end

local out = { now }
local o = 1 -- values in out
local k = 0 -- KEYS consumed by earlier decisions
local a = 2 -- ARGV consumed by earlier decisions
local counters = {} -- per window of the current decision: its counter if the window admits the request, else false
for _ = 1, decisions do
  local n = number(ARGV[a + 1])
  local cost = number(ARGV[a + 2])
  local has_quota = ARGV[a + 3] == '1'
  a = a + 3
  o = o + 1
  local denied_at = o
  out[o] = 0
  local denied = false
  for i = 1, n do
    local limit = number(ARGV[a + 1])
    local shadow = ARGV[a + 3] == '1'
    local used, fits, at, counter = check(KEYS[k + i], limit, number(ARGV[a + 2]), cost)
    a = a + 3
    if not fits and not shadow then denied = true end
    counters[i] = fits and counter
    out[o + 1] = used
    out[o + 2] = fits and 1 or 0
    out[o + 3] = at
    o = o + 3
  end
  if has_quota then
    local limit = number(ARGV[a + 1])
    local shadow = ARGV[a + 2] == '1'
    a = a + 2
    local used = tonumber(redis.call('GET', KEYS[k + n + 1]) or '0') or 0
    local fits = used + cost <= limit
    if not fits and not shadow then denied = true end
    out[o + 1] = used
    out[o + 2] = fits and 1 or 0
    o = o + 2
  end
  if denied then
    out[denied_at] = 1
  else
    for i = 1, n do
      if counters[i] then count(counters[i], cost) end
    end
  end
  k = k + n + (has_quota and 1 or 0)
end
for key, s in pairs(state) do store(key, s) end
return struct.pack('<' .. string.rep('i8', #out), unpack(out))
