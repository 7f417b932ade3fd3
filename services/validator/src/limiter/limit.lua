-- Rate-limit decisions, atomically, in one round trip: every decision of a batch of concurrent requests, in
-- order, each one all-or-nothing and seeing the counts of those before it. The arithmetic is window.rs's (read it
-- for why the bound is exact).
--
-- A counter is one string of little-endian 8-byte integers: its older non-empty buckets, oldest first, each as
-- index and units, then a trailer: its total, the bucket at which its expiry was last set, its oldest bucket, its
-- newest bucket and that bucket's units, and how many older buckets precede the trailer. A decision reads the
-- trailer alone (GETRANGE of the last 48 bytes: all it needs unless the oldest bucket has left the window) and
-- writes it in place with one SETRANGE, the finished bucket first when a new one starts; the whole counter is
-- rewritten only when old buckets have left or its expiry must move (at most once per window). This is what makes
-- the script cheap: binary integers instead of text to convert, one read and one write per counter, and little
-- Lua per call and per decision (Redis runs nothing else meanwhile, so every instruction here is on every
-- request's path): no tables but the few below, and no function that closes over many locals.
--
-- KEYS: every counter the batch's decisions use, each once (an organization's is shared by its keys' requests).
-- ARGV: buckets per window, number of decisions, number of limit kinds, then per kind (the batch's limits share a
--       few): limit, bucket_us (0 for a quota), shadow (0/1); then the decisions, packed in one string (an argument
--       per number, each made into a Lua string, cost an eighth of the call): per decision its windows (1 byte),
--       whether it has a quota (1 byte) and its cost (4 bytes), then per limit, the quota last, its kind and its
--       counter's index in KEYS (2 bytes each). Integers are little-endian and unsigned.
-- Returns: now_us, then per decision: per window: used, at_us (-1 = none), then if has_quota: used; packed as
--          little-endian 8-byte integers in one string, which the validator reads far more cheaply than an array of
--          as many integer replies. (Whether a limit fits, and so whether the request was admitted, follows from
--          used + cost <= limit: the validator knows both.)
-- A denied request (an enforced limit that does not fit) changes no count. A shadow limit that does not fit is
-- reported but does not deny, and is not counted.
local call, try_call, pack, read, byte = redis.call, redis.pcall, struct.pack, struct.unpack, string.byte
local t = call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local per_window = tonumber(ARGV[1])
local decisions = tonumber(ARGV[2])

local TRAILER = '<i8i8i8i8i8i8' -- total, expiry bucket, oldest bucket, newest bucket, its units, older buckets
local BUCKET_AND_TRAILER = '<i8i8i8i8i8i8i8i8' -- a finished bucket (index, units), then the trailer
local BUCKET = 16 -- bytes: index, units

-- Every counter this call reads, by its index k in KEYS, as 12 fields of one table from C[(k - 1) * 12]: one
-- table rather than one per field or per counter, each of which Redis would allocate and collect on every call.
--   +1  width: its bucket width (nil: not read yet)
--   +2  used: units in the window
--   +3  oldest: its oldest bucket still counted (false: none)
--   +4  target: the bucket this call counts in (the current one, or the newest if Redis time stepped back)
--   +5  in_target: units in it
--   +6  previous: the stored newest bucket when this call counts in a newer one (false: none)
--   +7  in_previous: units in it
--   +8  expiry: the bucket at which its expiry was last set (false: a new counter)
--   +9  older: how many older buckets it stores
--   +10 whole: the counter as stored, once read whole (false: only its trailer was read)
--   +11 from: the offset in `whole` of its first older bucket still in the window (1 when none has left)
--   +12 dirty: whether this call counted in it
local C = { unpack({}, 1, 12 * #KEYS) } -- sized once (a table grown from empty is rehashed at every power of two)
local currents, ttls = {}, {} -- per bucket width: the current bucket, and a counter's expiry (ms, the SET argument)

-- Counter `k` (from `b` in C) as stored, all of it: read once per call.
local function whole(k, b)
  local stored = C[b + 10]
  if not stored then
    stored = call('GET', KEYS[k]) or ''
    C[b + 10] = stored
  end
  return stored
end

-- Reads counter `k`, of buckets `width` wide, into C from `b`.
local function load(k, b, width)
  local current = currents[width]
  if not current then
    current = math.floor(now / width)
    currents[width] = current
    -- Twice the time a bucket stays in the window, so that the expiry moves at most once per window.
    ttls[width] = string.format('%d', 2 * math.ceil(width * (per_window + 1) / 1000) + 1)
  end
  -- try_call (redis.pcall): a key of another type (another writer's) is an error to it, which is read as a new
  -- counter (and written over) rather than failing every decision of the call.
  local trailer = try_call('GETRANGE', KEYS[k], '-48', '-1')
  local total, since, first_stored, newest, units, older = 0, false, 0, 0, 0, 0
  if type(trailer) == 'string' and #trailer == 48 then
    total, since, first_stored, newest, units, older = read(TRAILER, trailer)
    -- Numbers no counter of this script holds mean another writer: start afresh rather than count wrongly forever.
    if first_stored > newest or older < 0 or older > per_window + 2 then total = 0 end
  end
  local first = current - per_window
  local stored, from, start = false, 1, false
  if total > 0 and newest >= first then
    start = first_stored
    if older > 0 and first_stored < first then
      -- Older buckets left the window, and its total.
      stored = whole(k, b)
      if #stored ~= older * BUCKET + 48 then
        total, since, older, stored, start = 0, false, 0, '', false
      else
        local size, bucket = older * BUCKET, false
        while from < size do
          local c
          bucket, c = read('<i8i8', stored, from)
          if bucket >= first then break end
          total = total - c
          from = from + BUCKET
        end
        start = from < size and bucket or newest
      end
    end
  end
  -- Units the buckets cannot hold, too, mean another writer.
  if not start or total < units then
    total, since, older, stored, from, start = 0, false, 0, '', 1, false
  end
  C[b + 1], C[b + 2], C[b + 3], C[b + 8], C[b + 9], C[b + 10], C[b + 11], C[b + 12] =
    width, total, start, since, older, stored, from, false
  if start and newest >= current then
    C[b + 4], C[b + 5], C[b + 6], C[b + 7] = newest, units, false, 0
  else
    C[b + 4], C[b + 5], C[b + 6], C[b + 7] = current, 0, start and newest, units
  end
end

-- Writes what this call counted into counter `k`: its trailer (after the finished bucket, if any) in place, or the
-- whole counter when it is new, old buckets left, or its expiry must move.
local function store(k, b)
  local key, used, target, in_target, since, older = KEYS[k], C[b + 2], C[b + 4], C[b + 5], C[b + 8], C[b + 9]
  local previous = C[b + 6]
  if since and C[b + 11] == 1 and target - since < per_window then
    -- The oldest bucket is unchanged (it is the previous newest one if it was the only one).
    local oldest, at = C[b + 3], string.format('%d', older * BUCKET)
    if previous then
      call('SETRANGE', key, at, pack(BUCKET_AND_TRAILER, previous, C[b + 7], used, since, oldest, target, in_target,
        older + 1))
    else
      call('SETRANGE', key, at, pack(TRAILER, used, since, oldest, target, in_target, older))
    end
    return
  end
  local kept = string.sub(whole(k, b), C[b + 11], older * BUCKET)
  if previous then kept = kept .. pack('<i8i8', previous, C[b + 7]) end
  local count = #kept / BUCKET
  local oldest = count > 0 and read('<i8', kept) or target
  call('SET', key, kept .. pack(TRAILER, used, target, oldest, target, in_target, count), 'PX', ttls[C[b + 1]])
end

-- When bucket `bucket` of a window of `width` leaves it.
local function exit_at(bucket, width) return (bucket + 1 + per_window) * width end

-- When `cost` more fits under `limit` on counter `k`, which it does not now (see window.rs): after enough of the
-- oldest buckets have left.
local function retry_at(k, b, limit, cost)
  local width = C[b + 1]
  if cost > limit or not C[b + 3] then return -1 end
  local left = C[b + 2]
  local size, at = C[b + 9] * BUCKET, C[b + 11]
  if at < size then
    local counter = whole(k, b)
    while at < size do
      local bucket, c = read('<i8i8', counter, at)
      left = left - c
      if left + cost <= limit then return exit_at(bucket, width) end
      at = at + BUCKET
    end
  end
  local previous = C[b + 6]
  if previous and left - C[b + 7] + cost <= limit then return exit_at(previous, width) end
  return exit_at(C[b + 4], width)
end

-- Per limit kind, 3 fields from K[(kind - 1) * 3 + 1]: limit, bucket width, shadow.
local K = {}
local a = 3 -- ARGV consumed
for kind = 1, tonumber(ARGV[3]) do
  K[3 * kind - 2], K[3 * kind - 1], K[3 * kind] = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3] == '1'
  a = a + 3
end
local packed = ARGV[a + 1]

-- At most 2 values per limit (4 packed bytes) of each decision (6 bytes), and the clock.
local out = { now, unpack({}, 1, (#packed - 6 * decisions) / 2) }
local o = 1 -- values in out
local admitting = {} -- per window of the current decision: its counter's offset in C if it admits, else false
local p = 1 -- next byte of `packed`

-- The next limit of a decision: where its kind ends in K (limit, width, shadow: K[kind - 2], K[kind - 1], K[kind]),
-- its counter's index in KEYS, and where that counter starts in C.
local function next_limit()
  local k0, k1, i0, i1 = byte(packed, p, p + 3)
  p = p + 4
  local k = i0 + 256 * i1
  return 3 * (k0 + 256 * k1), k, (k - 1) * 12
end

for _ = 1, decisions do
  local n, has_quota, c0, c1, c2, c3 = byte(packed, p, p + 5)
  local cost = c0 + 256 * (c1 + 256 * (c2 + 256 * c3))
  p = p + 6
  local denied = false
  for i = 1, n do
    local kind, k, b = next_limit()
    local limit, width = K[kind - 2], K[kind - 1]
    if not C[b + 1] then load(k, b, width) end
    local units = C[b + 2]
    local at = -1
    if units + cost <= limit then
      if C[b + 3] then at = exit_at(C[b + 3], width) end
      admitting[i] = b
    else
      at = retry_at(k, b, limit, cost)
      admitting[i] = false
      if not K[kind] then denied = true end
    end
    out[o + 1], out[o + 2] = units, at
    o = o + 2
  end
  if has_quota == 1 then
    local kind, k, b = next_limit()
    -- The workers write quota counters, never this script; each is read once per call, kept as its `used`.
    local units = C[b + 2]
    if not units then
      local stored = try_call('GET', KEYS[k]) -- as above: another writer's value counts as none
      units = type(stored) == 'string' and tonumber(stored) or 0
      C[b + 2] = units
    end
    if units + cost > K[kind - 2] and not K[kind] then denied = true end
    out[o + 1] = units
    o = o + 1
  end
  if not denied then
    for i = 1, n do
      local b = admitting[i]
      if b then
        C[b + 2] = C[b + 2] + cost
        C[b + 5] = C[b + 5] + cost
        if not C[b + 3] then C[b + 3] = C[b + 4] end
        C[b + 12] = true
      end
    end
  end
end
for k = 1, #KEYS do
  if C[(k - 1) * 12 + 12] then store(k, (k - 1) * 12) end
end
return pack('<' .. string.rep('i8', o), unpack(out, 1, o))
