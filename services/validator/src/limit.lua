-- Rate-limit decisions, atomically, in one round trip: every decision of a batch of concurrent requests, in
-- order, each one all-or-nothing and seeing the counts of those before it. The arithmetic is window.rs's (read it
-- for why the bound is exact).
--
-- A counter is one string of little-endian 8-byte integers: a header (its total, the bucket at which its expiry
-- was last set, its newest bucket and that bucket's units), then its older non-empty buckets, oldest first, each as
-- index and units. A decision reads its first 48 bytes (GETRANGE: the header and the oldest bucket, all it needs
-- unless that bucket has left the window), and writes it in place: the header alone while requests land in the
-- newest bucket, plus one APPEND when a new bucket starts; the whole counter is rewritten only when old buckets
-- have left or its expiry must move (at most once per window). This is what makes the script cheap:
-- binary integers instead of text to convert, few writes, and little Lua per decision (Redis runs nothing else
-- meanwhile, so every instruction here is on every request's path).
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
local call, pack, read, byte = redis.call, struct.pack, struct.unpack, string.byte
local KEYS, ARGV = KEYS, ARGV
local t = call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local per_window = tonumber(ARGV[1])
local decisions = tonumber(ARGV[2])

local HEADER = 32 -- bytes: total, expiry bucket, newest bucket, its units
local BUCKET = 16 -- bytes: index, units
local READ, READ_BYTES = '47', 48 -- a header and one bucket (GETRANGE's last byte, and their size)

-- Per bucket width: the current bucket, and the expiry of a counter (ms, as the SET argument): twice the time a
-- bucket stays in the window, so that it moves at most once per window.
local currents, ttls = {}, {}

-- Every counter this call touches, by number: a counter shared by the batch's requests (their organization's) is
-- read once and written once per call. The arrays below start with room for 16 counters (a typical call's): a Lua
-- table grown from empty is rehashed at every power of two, 5 times per array to reach 16 (callgrind: 5 400
-- instructions per decision, of 71 800). Per counter, as it stands with what this call counted:
local function array()
  return { false, false, false, false, false, false, false, false, false, false, false, false, false, false, false, false }
end
local counters = 0
local ids = {} -- by index in KEYS
local names = array() -- its key
local used = array() -- units in the window
local oldest = array() -- its oldest bucket (false: none)
local target = array() -- the bucket this call counts in: the current one, or the newest if Redis time stepped back
local in_target = array() -- units in it
local stored = array() -- the counter as read: its header and first older bucket, or all of it
local partial = array() -- whether `stored` may lack older buckets
local from = array() -- offset in `stored` of its first older bucket still in the window
local previous = array() -- the stored newest bucket when this call counts in a newer one (false: none)
local in_previous = array() -- units in it
local expiry = array() -- the bucket at which its expiry was last set (false: a new counter)
local width_of = array() -- its bucket width
local dirty = array() -- whether this call counted in it

local function load(index, width)
  local key = KEYS[index]
  counters = counters + 1
  local id = counters
  ids[index] = id
  names[id] = key
  width_of[id] = width
  local current = currents[width]
  if current == nil then
    current = math.floor(now / width)
    currents[width] = current
    ttls[width] = string.format('%d', 2 * math.ceil(width * (per_window + 1) / 1000) + 1)
  end
  -- A long counter (an organization's) is not copied into Lua whole for every call.
  local counter = call('GETRANGE', key, '0', READ)
  local size = #counter
  local cut = size == READ_BYTES
  local total, since, newest, units = 0, false, 0, 0
  -- A counter of another length (never written by this script) starts afresh rather than count wrongly forever.
  if size >= HEADER and (size - HEADER) % BUCKET == 0 then
    total, since, newest, units = read('<i8i8i8i8', counter)
  end
  local first = current - per_window
  local at, start = HEADER + 1, false
  if total > 0 and newest >= first then
    -- Older buckets that left the window leave its total.
    while at + BUCKET - 1 <= size do
      local b, c = read('<i8i8', counter, at)
      if b >= first then
        start = b
        break
      end
      if cut then
        counter, cut = call('GET', key), false
        size = (#counter - HEADER) % BUCKET == 0 and #counter or 0
      end
      total = total - c
      at = at + BUCKET
    end
    start = start or newest
    -- Units the buckets cannot hold mean a counter this script did not write: start afresh.
    if total < units then total, start, since, counter, cut, at = 0, false, false, '', false, 1 end
  else
    total, since, counter, cut, at = 0, false, '', false, 1
  end
  stored[id], partial[id], from[id], used[id], oldest[id], expiry[id], dirty[id] =
    counter, cut, at, total, start, since, false
  if start and newest >= current then
    target[id], in_target[id], previous[id], in_previous[id] = newest, units, false, 0
  else
    target[id], in_target[id], previous[id], in_previous[id] = current, 0, start and newest, units
  end
  return id
end

-- Counter `id` as stored, all of it.
local function whole(id)
  if partial[id] then
    stored[id], partial[id] = call('GET', names[id]) or '', false
  end
  return stored[id]
end

-- Writes what this call counted: the header (and a finished bucket) in place, or the whole counter when it is new,
-- old buckets left, or its expiry must move.
local function store(id)
  local key, at, tb, since = names[id], from[id], target[id], expiry[id]
  local head
  if since and at == HEADER + 1 and tb - since < per_window then
    head = pack('<i8i8i8i8', used[id], since, tb, in_target[id])
    if previous[id] then call('APPEND', key, pack('<i8i8', previous[id], in_previous[id])) end
    call('SETRANGE', key, '0', head)
    return
  end
  head = pack('<i8i8i8i8', used[id], tb, tb, in_target[id])
  local older = string.sub(whole(id), at)
  if previous[id] then older = older .. pack('<i8i8', previous[id], in_previous[id]) end
  call('SET', key, head .. older, 'PX', ttls[width_of[id]])
end

-- When bucket `b` of a window of `width` leaves it.
local function exit_at(b, width) return (b + 1 + per_window) * width end

-- When `cost` more fits under `limit` on counter `id`, which it does not now (see window.rs): after enough of the
-- oldest buckets have left.
local function retry_at(id, limit, width, cost)
  if cost > limit or not oldest[id] then return -1 end
  local left = used[id]
  local counter, at = whole(id), from[id]
  local size = #counter
  while at + BUCKET - 1 <= size do
    local b, c = read('<i8i8', counter, at)
    left = left - c
    if left + cost <= limit then return exit_at(b, width) end
    at = at + BUCKET
  end
  if previous[id] and left - in_previous[id] + cost <= limit then return exit_at(previous[id], width) end
  return exit_at(target[id], width)
end

local limits, widths, shadows = {}, {}, {}
local a = 3 -- ARGV consumed
for kind = 1, tonumber(ARGV[3]) do
  limits[kind], widths[kind], shadows[kind] = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3] == '1'
  a = a + 3
end
local packed = ARGV[a + 1]

-- The next limit of a decision: its kind and its counter's index in KEYS.
local p = 1 -- next byte of `packed`
local function next_limit()
  local k0, k1, i0, i1 = byte(packed, p, p + 3)
  p = p + 4
  return k0 + 256 * k1, i0 + 256 * i1
end

local out = { now }
local o = 1 -- values in out
local quotas = {} -- quota counters read by this call, by index in KEYS (the workers write them, never this script)
local admitting = {} -- per window of the current decision: its counter if the window admits the request, else false
for _ = 1, decisions do
  local n, has_quota, c0, c1, c2, c3 = byte(packed, p, p + 5)
  local cost = c0 + 256 * (c1 + 256 * (c2 + 256 * c3))
  p = p + 6
  local denied = false
  for i = 1, n do
    local kind, index = next_limit()
    local limit, width = limits[kind], widths[kind]
    local id = ids[index] or load(index, width)
    local units = used[id]
    local fits = units + cost <= limit
    local at = -1
    if fits then
      if oldest[id] then at = exit_at(oldest[id], width) end
      admitting[i] = id
    else
      at = retry_at(id, limit, width, cost)
      admitting[i] = false
      if not shadows[kind] then denied = true end
    end
    out[o + 1], out[o + 2] = units, at
    o = o + 2
  end
  if has_quota == 1 then
    local kind, index = next_limit()
    local units = quotas[index]
    if not units then
      units = tonumber(call('GET', KEYS[index]) or '0') or 0
      quotas[index] = units
    end
    if units + cost > limits[kind] and not shadows[kind] then denied = true end
    out[o + 1] = units
    o = o + 1
  end
  if not denied then
    for i = 1, n do
      local id = admitting[i]
      if id then
        used[id] = used[id] + cost
        in_target[id] = in_target[id] + cost
        if not oldest[id] then oldest[id] = target[id] end
        dirty[id] = true
      end
    end
  end
end
for id = 1, counters do
  if dirty[id] then store(id) end
end
return pack('<' .. string.rep('i8', #out), unpack(out))
