-- claim: a worker takes a delivered job before anything is launched, in one step. A stored record
-- ends it there; a message that is not the job's current delivery is stale; a live lease of another
-- claim means another delivery runs the job. Otherwise the lease is taken and the claim generation
-- counted up (every later renewal, requeue and finish of this holder is fenced by it), a slot the
-- previous claim still held is given back (its holder died or was fenced out), and the history
-- the workers wrote (attempts, time window, waits) is handed back with the server clock. Last, a
-- daemon slot: the daemon that last built the job's cache when it is one of this worker's, up and
-- with room (or, full and `affinity_wait` set, nothing: the caller waits for it), else the least
-- loaded daemon with room (load_fn.lua). The job is then `running` on it. A build that exports and
-- starts at once (a slot, no cancel, no lost run to settle first) also asks for its cache ref's
-- export lease here (export_fn.lua), so its launch needs no round trip of its own.
local job_hash = KEYS[1]
local jobs_index = KEYS[2]     -- the recent jobs (score -enqueued_at while claimed)
local load_index = KEYS[3]     -- this worker's daemons, scored by their builds
local affinity_key = KEYS[4]   -- '' when cache affinity is off
local export_lease = KEYS[5]   -- export:<cache key> of a build that exports; '' for none
local job_id = ARGV[1]
local delivery = ARGV[2]       -- the delivery id of the message being handled
local token = ARGV[3]          -- this claim's lease token
local ttl_ms = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])      -- builds per daemon
local affinity_wait = ARGV[6]  -- '1': wait for a full remembered daemon
local job_ttl = tonumber(ARGV[7])
local worker = ARGV[8]         -- host:pid of the claiming process
local domain = ARGV[9]         -- where its runs can be killed from (a host's state folder, an engine)
local body = ARGV[10]          -- the job's JSON, kept for the janitor and `buildq retry`
local queue_name = ARGV[11]
local export_keep_s = tonumber(ARGV[12])  -- how long the export lease key is kept after a write
-- -> {0, record} finished | {1} the lease is held by another claim | {3} a stale delivery
--    | {4} the load index is gone (a Redis that lost its data: the caller registers it, tries again)
--    | {2, gen, now_ms, cancelled (1|0), daemon ('' none), remembered daemon ('' none),
--       remembered full (1|0), attempt number, enqueued_at, attempts, window_start,
--       waiting_since, running, previous domain, export lease (0 not asked | take_export's
--       1 granted | 2 a newer build's | 3 an older build's), the other build ('' none)}
local h = read(job_hash, {'record', 'delivery', 'gen', 'lease', 'lease_until', 'enqueued_at',
  'attempts', 'window_start', 'waiting_since', 'running', 'domain', 'avoid', 'job', 'cancel', 'slot',
  'slot_load'})
if h.record then return {0, h.record} end
if h.delivery and h.delivery ~= delivery then return {3} end
-- the same token: this very claim ran before and its reply was lost (the client tries again)
local again = h.lease == token
if not again and h.lease and tonumber(h.lease_until or '0') > now then return {1} end
local gen = tonumber(h.gen or '0')
local set = {'lease', token, 'lease_until', now + ttl_ms, 'holder', worker, 'domain', domain}
if not again then
  gen = gen + 1
  extend(set, {'gen', gen})
  extend(set, give_back(h))
end
local enqueued_at = h.enqueued_at
if not enqueued_at then  -- a producer's own message: the job is new here
  enqueued_at = string.format('%.3f', now / 1000)
  extend(set, {'enqueued_at', enqueued_at, 'state', 'queued'})
end
if not h.delivery then extend(set, {'delivery', delivery}) end
if not h.job then extend(set, {'job', body, 'queue', queue_name}) end
-- the attempt this claim runs: after the recorded ones, and after one a dead holder lost
local attempt = 1
if h.attempts then attempt = #cjson.decode(h.attempts) + 1 end
if h.running and cjson.decode(h.running).gen ~= gen then attempt = attempt + 1 end
local cancelled, daemon, remembered, full = 0, '', '', 0
if h.cancel then
  cancelled = 1
elseif again then
  daemon = h.slot or ''
else
  local avoid = h.avoid or ''
  if affinity_key ~= '' then
    local name = redis.call('GET', affinity_key)
    local load = name and redis.call('ZSCORE', load_index, name)
    if load then  -- remembered, and one of this worker's daemons (not taken when avoided or down)
      remembered = name
      if name ~= avoid and tonumber(load) < limit then
        daemon = name
      elseif name ~= avoid and tonumber(load) < DOWN_LOAD and affinity_wait == '1' then
        full = 1
      end
    end
  end
  if daemon == '' and full == 0 then
    daemon = least_loaded(load_index, limit, avoid)
    if daemon == '' and redis.call('EXISTS', load_index) == 0 then return {4} end
  end
  if daemon ~= '' then extend(set, take(load_index, daemon)) end
end
if cancelled == 0 then
  -- the run this claim starts, until its requeue or finish: a claim that finds it still there
  -- knows the previous holder's attempt was lost (its worker died or was fenced out mid-build)
  extend(set, {'running', cjson.encode({started_at = now / 1000, worker = worker, daemon = daemon, gen = gen})})
  if daemon ~= '' then
    extend(set, {'state', 'running', 'phase', 'launch', 'attempt', attempt, 'worker', worker,
      'daemon', daemon, 'started_at', string.format('%.3f', now / 1000)})
  end
end
local export, export_other = 0, ''
if export_lease ~= '' and cancelled == 0 and daemon ~= '' and not h.running then
  local answer = take_export(export_lease, job_id, enqueued_at, ttl_ms, export_keep_s)
  export, export_other = answer[1], answer[2]
end
redis.call('HSET', job_hash, unpack(set))
if not h.enqueued_at then redis.call('EXPIRE', job_hash, job_ttl) end
redis.call('ZADD', jobs_index, -tonumber(enqueued_at), job_id)
return {2, gen, now, cancelled, daemon, remembered, full, attempt, enqueued_at, h.attempts or '',
  h.window_start or '', h.waiting_since or '', h.running or '', h.domain or '', export, export_other}
