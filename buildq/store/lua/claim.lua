-- claim: a worker takes a delivered job before anything is launched, in one step. A stored result
-- ends it there; a message that is not the job's current delivery is stale; a live lease elsewhere
-- means another delivery runs the job. Otherwise the lease is taken and the claim generation
-- counted up (every later renewal, requeue and finish of this holder is fenced by it), and the
-- history the workers wrote (attempts, time window, waits) is handed back with the server clock.
-- Last, a daemon slot: the daemon that last built the job's cache when it is up and has room (or,
-- full and `affinity_wait` set, nothing: the caller waits for it), else the least loaded one.
local result_key = KEYS[1]
local lease_key = KEYS[2]
local job_hash = KEYS[3]
local cancel_key = KEYS[4]
local affinity_key = KEYS[5]   -- '' when cache affinity is off
local down_hash = KEYS[6]      -- daemons whose circuit breaker is open
local slot_sets = {unpack(KEYS, 7)}  -- one per daemon, in the caller's preference order
local job_id = ARGV[1]
local delivery = ARGV[2]       -- the delivery id of the message being handled
local token = ARGV[3]          -- this claim's lease token (also its slot member)
local ttl_ms = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])      -- builds per daemon
local prefix_len = tonumber(ARGV[6]) -- slot key prefix length (a set's name minus it is its daemon)
local affinity_wait = ARGV[7]  -- '1': wait for a full remembered daemon
local job_ttl = tonumber(ARGV[8])
local worker = ARGV[9]         -- host:pid of the claiming process
local domain = ARGV[10]        -- where its runs can be killed from (a host's state folder, an engine)
local body = ARGV[11]          -- the job's JSON, kept for the janitor and `buildq retry`
local queue_name = ARGV[12]
-- -> {0, record} finished | {1} the lease is held by another delivery | {3} a stale delivery
--    | {2, gen, now_ms, cancelled, slot position, remembered position, remembered full (1|0),
--       enqueued_at, attempts, window_start, waiting_since, running, previous domain}
local record = redis.call('GET', result_key)
if record then return {0, record} end
local current = redis.call('HGET', job_hash, 'delivery')
if current and current ~= delivery then return {3} end
local gen
if redis.call('GET', lease_key) == token then
  -- this very claim ran before and its reply was lost (the client tries again): the same claim
  gen = tonumber(redis.call('HGET', job_hash, 'gen'))
else
  if not redis.call('SET', lease_key, token, 'NX', 'PX', ttl_ms) then return {1} end
  gen = redis.call('HINCRBY', job_hash, 'gen', 1)
end
local h = redis.call('HMGET', job_hash, 'enqueued_at', 'attempts', 'window_start', 'waiting_since',
  'running', 'domain', 'avoid', 'job')
local enqueued_at = h[1]
if not enqueued_at then
  enqueued_at = string.format('%.3f', now / 1000)
  redis.call('HSET', job_hash, 'enqueued_at', enqueued_at, 'state', 'queued')
end
if not current then redis.call('HSET', job_hash, 'delivery', delivery) end
if not h[8] then redis.call('HSET', job_hash, 'job', body, 'queue', queue_name) end
redis.call('HSET', job_hash, 'holder', worker, 'domain', domain)
redis.call('EXPIRE', job_hash, job_ttl)
local history = {enqueued_at, h[2] or '', h[3] or '', h[4] or '', h[5] or '', h[6] or ''}
-- the run this claim starts, until its requeue or finish: a claim that finds it still there knows
-- the previous holder's attempt was lost (its worker died or was fenced out mid-build)
local function reply(cancelled, position, remembered, full)
  if cancelled == 0 then
    local daemon = ''
    if position > 0 then daemon = string.sub(slot_sets[position], prefix_len + 1) end
    redis.call('HSET', job_hash, 'running',
      cjson.encode({started_at = now / 1000, worker = worker, daemon = daemon, gen = gen}))
  end
  local out = {2, gen, now, cancelled, position, remembered, full}
  for _, v in ipairs(history) do out[#out + 1] = v end
  return out
end
if redis.call('EXISTS', cancel_key) == 1 then return reply(1, 0, 0, 0) end
local avoid = h[7] or ''
local at, got = take_remembered(affinity_key, slot_sets, down_hash, token, ttl_ms, limit, prefix_len,
  avoid, affinity_wait)
if got == 1 then return reply(0, at, at, 0) end
if got == 2 then return reply(0, 0, at, 1) end
return reply(0, take_any(slot_sets, down_hash, token, ttl_ms, limit, prefix_len, avoid), at, 0)
