"""The Lua scripts of fair dispatch: each one atomic, each O(1) or O(log n) per message.

Key layout (``R`` is :data:`ROOT`, with kombu's ``global_keyprefix`` in front of
every key; ``D`` is the name of the Redis list kombu consumes for one queue and
priority step, e.g. ``celery`` or ``celery\\x06\\x163``):

* ``D`` itself: the doorbell. It holds plain messages as kombu puts them and one
  :data:`TOKEN` per tenant message waiting in a lane; workers ``BRPOP`` it as usual.
* ``R:D:lane:LANE``: one lane's messages, oldest first. ``LANE`` is the tenant, or
  ``tenant\\ngroup\\nconcurrency\\nrate`` for a task with per-tenant limits. Each
  item is ``TAG\\rTAIL\\rmessage``: kombu's delivery tag and the end of the record
  kombu keeps of an unacked message (``,"exchange","routing key"]``), so that the
  script taking it records it as unacked in the same step (a message alone, JSON
  starting with ``{``, is delivered without that record, and kombu writes it).
* ``R:D:ring``: the lanes that have messages and may run now, in round-robin order.
* ``R:D:held``: lanes held back by a limit (sorted set, score: when to look again).
* ``R:D:parked``: how many tokens found every waiting lane held back (they come
  back one per freed slot, instead of circling through the broker).
* ``R:D:due``: messages whose ``eta``/``countdown`` is still ahead (sorted set,
  score: due time; member ``LANE\\rmessage``), moved into their lane when due.
* ``R:lease:group\\ntenant``: live leases of a limit (sorted set, score: expiry).
* ``R:rate:group\\ntenant``: the token bucket of a rate limit (hash).
* ``R:waiters:group\\ntenant``: ``D\\rLANE`` of the lanes that limit holds back, so
  that a release wakes them at once (it expires: the tick wakes them anyway).
* ``R:limits``: every ``group\\ntenant`` that ever took a lease (for the queues table).
"""

from __future__ import annotations

#: Namespace of every fair-dispatch key.
ROOT = "tenant_jobs.fair"
#: What the doorbell holds for a tenant message waiting in a lane.
TOKEN = "tenant_jobs.fair:token"
#: How many due messages or held lanes one tick moves at most (per queue and priority).
TICK_BATCH = 100

_PRELUDE = f"""
local root = KEYS[1]
local prefix = string.sub(root, 1, #root - #ARGV[1])
local TOKEN = '{TOKEN}'
local function base(d) return root .. ':' .. d end
local function doorbell(d) return prefix .. d end
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function split(s, sep)
  local out = {{}}
  local start = 1
  while true do
    local at = string.find(s, sep, start, true)
    if not at then
      out[#out + 1] = string.sub(s, start)
      return out
    end
    out[#out + 1] = string.sub(s, start, at - 1)
    start = at + 1
  end
end
local function unpark_one(d)
  local parked = base(d) .. ':parked'
  if tonumber(redis.call('GET', parked) or '0') > 0 then
    redis.call('DECR', parked)
    redis.call('LPUSH', doorbell(d), TOKEN)
  end
end
local function wake(d, lane)
  if redis.call('ZREM', base(d) .. ':held', lane) == 1 then
    redis.call('RPUSH', base(d) .. ':ring', lane)
  end
  unpark_one(d)
end
local function message_of(item)
  if string.sub(item, 1, 1) == '{{' then return item, nil, nil end
  local tag_end = string.find(item, '\\r', 1, true)
  local tail_end = tag_end and string.find(item, '\\r', tag_end + 1, true)
  if not tail_end then return item, nil, nil end
  return string.sub(item, tail_end + 1), string.sub(item, 1, tag_end - 1),
    string.sub(item, tag_end + 1, tail_end - 1)
end
local function recorded(item, unacked, index, at)
  local msg, tag, tail = message_of(item)
  if unacked == '' or not tag then return msg, 0 end
  redis.call('ZADD', prefix .. index, at, tag)
  redis.call('HSET', prefix .. unacked, tag, '[' .. msg .. ',' .. tail)
  return msg, 1
end
local function enqueue(d, lane, msg, at_head)
  local key = base(d) .. ':lane:' .. lane
  local size
  if at_head then size = redis.call('LPUSH', key, msg) else size = redis.call('RPUSH', key, msg) end
  if size == 1 then redis.call('RPUSH', base(d) .. ':ring', lane) end
  redis.call('LPUSH', doorbell(d), TOKEN)
end
"""

#: ARGV: root, D, lane, lane item, due (epoch seconds, 0: now), at_head (1/0).
PUT = _PRELUDE + """
local due = tonumber(ARGV[5])
if due > 0 and due > now_s() then
  redis.call('ZADD', base(ARGV[2]) .. ':due', due, ARGV[3] .. '\\r' .. ARGV[4])
  return 0
end
enqueue(ARGV[2], ARGV[3], ARGV[4], ARGV[6] == '1')
return 1
"""

#: The pick, shared by :data:`PICK` and :data:`TAKE`: ``pick(d, ttl, token, held_back)``
#: gives the oldest item of the next lane of ``d``'s ring that no limit holds back,
#: and the limit whose lease ``token`` it took ("" when the lane has no concurrency
#: limit), or nothing; the lanes it held back are added to ``held_back`` as lane and
#: head message.
_PICKING = """
local function admit(lane, ttl, token, now)
  local f = split(lane, '\\n')
  if #f < 4 then return 0, '' end
  local limit = f[2] .. '\\n' .. f[1]
  local concurrency, rate = tonumber(f[3]), tonumber(f[4])
  local lease_key = root .. ':lease:' .. limit
  local rate_key = root .. ':rate:' .. limit
  local wake_at = 0
  if concurrency > 0 then
    redis.call('ZREMRANGEBYSCORE', lease_key, '-inf', now)
    if redis.call('ZCARD', lease_key) >= concurrency then
      local first = redis.call('ZRANGE', lease_key, 0, 0, 'WITHSCORES')
      wake_at = tonumber(first[2])
    end
  end
  local tokens = 1
  if rate > 0 then
    local bucket = redis.call('HMGET', rate_key, 'tokens', 'at')
    if bucket[1] then
      tokens = math.min(1, tonumber(bucket[1]) + (now - tonumber(bucket[2])) * rate)
    end
    if tokens < 1 then wake_at = math.max(wake_at, now + (1 - tokens) / rate) end
  end
  if wake_at > 0 then return wake_at, limit end
  if concurrency > 0 then
    redis.call('ZADD', lease_key, now + ttl, token)
    redis.call('SADD', root .. ':limits', limit)
  end
  if rate > 0 then
    redis.call('HSET', rate_key, 'tokens', tokens - 1, 'at', now)
    redis.call('EXPIRE', rate_key, math.ceil(2 / rate) + 1)
  end
  if concurrency > 0 then return 0, limit end
  return 0, ''
end

local function pick(d, ttl, token, held_back)
  local ring = base(d) .. ':ring'
  local held = base(d) .. ':held'
  local now = now_s()
  local lanes = redis.call('LLEN', ring)
  for _ = 1, lanes do
    local lane = redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
    local key = base(d) .. ':lane:' .. lane
    local wake_at, limit = admit(lane, ttl, token, now)
    if wake_at == 0 then
      local msg = redis.call('LPOP', key)
      if redis.call('LLEN', key) == 0 then redis.call('RPOP', ring) end
      if msg then return msg, limit end
    else
      redis.call('RPOP', ring)
      redis.call('ZADD', held, wake_at, lane)
      redis.call('SADD', root .. ':waiters:' .. limit, d .. '\\r' .. lane)
      redis.call('EXPIRE', root .. ':waiters:' .. limit, math.ceil(2 * ttl) + 60)
      held_back[#held_back + 1] = lane
      held_back[#held_back + 1] = (message_of(redis.call('LINDEX', key, 0) or ''))
    end
  end
  if redis.call('ZCARD', held) > 0 then redis.call('INCR', base(d) .. ':parked') end
  return nil, ''
end
"""

#: ARGV: root, D, slot ttl (seconds), lease token, unacked hash, unacked index, its score
#: (the worker's clock; all "" to leave the unacked record to kombu). The pick for one
#: token popped from D.
#: Returns {message or false, lease ("group\\ntenant") or "", recorded as unacked (1/0),
#: held-back lanes...}.
PICK = _PRELUDE + _PICKING + """
local held_back = {}
local item, limit = pick(ARGV[2], tonumber(ARGV[3]), ARGV[4], held_back)
if not item then return {false, limit, 0, unpack(held_back)} end
local msg, done = recorded(item, ARGV[5], ARGV[6], ARGV[7])
return {msg, limit, done, unpack(held_back)}
"""

#: ARGV: root, slot ttl, lease token, batch, unacked hash, index and score (see PICK),
#: D... (in the order a ``BRPOP`` would look).
#: Pops the next item of the first D that has one and, for a token, picks in the same
#: call: one round trip per message while the queues are busy. A token that finds every
#: lane held back is parked and the next item popped, at most ``batch`` in one call.
#: Returns {status, D or "", message or false, lease or "", recorded as unacked (1/0),
#: held-back lanes...}; status 1: a message, 0: only parked tokens (call again), -1:
#: every D was empty (block).
TAKE = _PRELUDE + _PICKING + """
local ttl, token, budget = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local held_back = {}
local status = -1
for i = 8, #ARGV do
  local d = ARGV[i]
  while budget > 0 do
    local item = redis.call('RPOP', doorbell(d))
    if not item then break end
    budget = budget - 1
    if item ~= TOKEN then return {1, d, item, '', 0, unpack(held_back)} end
    local picked, limit = pick(d, ttl, token, held_back)
    if picked then
      local msg, done = recorded(picked, ARGV[5], ARGV[6], ARGV[7])
      return {1, d, msg, limit, done, unpack(held_back)}
    end
    status = 0
  end
end
return {status, '', false, '', 0, unpack(held_back)}
"""

#: ARGV: root, "group\\ntenant", lease token, D it was delivered from.
#: Frees the slot only if that very lease is still live (fenced, idempotent).
RELEASE = _PRELUDE + """
local limit = ARGV[2]
if redis.call('ZREM', root .. ':lease:' .. limit, ARGV[3]) == 0 then return 0 end
local waiters = root .. ':waiters:' .. limit
local woke_own = false
for _, member in ipairs(redis.call('SMEMBERS', waiters)) do
  local f = split(member, '\\r')
  wake(f[1], f[2])
  if f[1] == ARGV[4] then woke_own = true end
end
redis.call('DEL', waiters)
if not woke_own then unpark_one(ARGV[4]) end
return 1
"""

#: ARGV: root, batch, D... Moves due messages into their lanes, wakes held lanes
#: whose time came, gives lost tokens back; returns the next time to look (0: none).
TICK = _PRELUDE + """
local now = now_s()
local batch = tonumber(ARGV[2])
local next_at = 0
local function sooner(zset)
  local first = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
  if first[2] then
    local at = tonumber(first[2])
    if next_at == 0 or at < next_at then next_at = at end
  end
end
for i = 3, #ARGV do
  local d = ARGV[i]
  local due = base(d) .. ':due'
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, batch)) do
    redis.call('ZREM', due, member)
    local cut = string.find(member, '\\r', 1, true)
    enqueue(d, string.sub(member, 1, cut - 1), string.sub(member, cut + 1), false)
  end
  local held = base(d) .. ':held'
  for _, lane in ipairs(redis.call('ZRANGEBYSCORE', held, '-inf', now, 'LIMIT', 0, batch)) do
    wake(d, lane)
  end
  local ring = base(d) .. ':ring'
  if redis.call('LLEN', ring) > 0 and redis.call('LLEN', doorbell(d)) == 0 then
    redis.call('LPUSH', doorbell(d), TOKEN)
  end
  sooner(due)
  sooner(held)
end
return tostring(next_at)
"""

#: ARGV: root, D... Returns {lane, ready, held (0/1)...} and {"\\rdue", lane, count}.
BACKLOG = _PRELUDE + """
local out = {}
for i = 2, #ARGV do
  local d = ARGV[i]
  for _, lane in ipairs(redis.call('LRANGE', base(d) .. ':ring', 0, -1)) do
    out[#out + 1] = lane
    out[#out + 1] = redis.call('LLEN', base(d) .. ':lane:' .. lane)
    out[#out + 1] = 0
  end
  for _, lane in ipairs(redis.call('ZRANGE', base(d) .. ':held', 0, -1)) do
    out[#out + 1] = lane
    out[#out + 1] = redis.call('LLEN', base(d) .. ':lane:' .. lane)
    out[#out + 1] = 1
  end
  for _, member in ipairs(redis.call('ZRANGE', base(d) .. ':due', 0, -1)) do
    local cut = string.find(member, '\\r', 1, true)
    out[#out + 1] = string.sub(member, 1, cut - 1)
    out[#out + 1] = 1
    out[#out + 1] = 2
  end
end
return out
"""

#: ARGV: root, D... Deletes the queue's messages, plain and tenant, ready, held back and
#: not due yet; returns how many there were.
PURGE = _PRELUDE + """
local total = 0
for i = 2, #ARGV do
  local d = ARGV[i]
  local b = base(d)
  redis.call('LREM', doorbell(d), 0, TOKEN)
  total = total + redis.call('LLEN', doorbell(d))
  local lanes = redis.call('LRANGE', b .. ':ring', 0, -1)
  for _, lane in ipairs(redis.call('ZRANGE', b .. ':held', 0, -1)) do lanes[#lanes + 1] = lane end
  for _, lane in ipairs(lanes) do
    total = total + redis.call('LLEN', b .. ':lane:' .. lane)
    redis.call('DEL', b .. ':lane:' .. lane)
  end
  total = total + redis.call('ZCARD', b .. ':due')
  redis.call('DEL', doorbell(d), b .. ':ring', b .. ':held', b .. ':parked', b .. ':due')
end
return total
"""

#: ARGV: root. Returns {"group\\ntenant", live leases...}.
RUNNING = _PRELUDE + """
local now = now_s()
local out = {}
for _, limit in ipairs(redis.call('SMEMBERS', root .. ':limits')) do
  local live = redis.call('ZCOUNT', root .. ':lease:' .. limit, now, '+inf')
  if live > 0 then
    out[#out + 1] = limit
    out[#out + 1] = live
  end
end
return out
"""
