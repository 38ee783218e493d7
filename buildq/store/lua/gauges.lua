-- gauges: the deployment's queue gauges, computed by one worker at a time. The worker holding the
-- gauges lease (or taking it, when it is free or has expired) counts, writes the snapshot and
-- renews the lease; every other worker gets the last snapshot (one GET). Counting is bounded:
-- O(queues + daemons) counts, plus a walk over the queued band of the jobs index that stops at the
-- first job due (what it passes are jobs in a retry backoff) and one over the waiting index (jobs
-- that moved on are dropped from it here), each at most `walk_max`.
-- Job hashes are read by name (`job_prefix` .. id), as the janitor's indexes hold only ids.
local lease_key = KEYS[1]      -- who computes (expires unless renewed)
local snapshot_key = KEYS[2]   -- the last snapshot (JSON)
local jobs_index = KEYS[3]     -- the recent jobs by state band (queued: score enqueued_at, epoch s)
local waiting_index = KEYS[4]  -- jobs put back to wait for a daemon
local workers = KEYS[5]        -- live worker main processes (score: expiry ms)
local queue = KEYS[6]          -- the normal queue's list
local high_queue = KEYS[7]     -- the high-priority queue's list
local load_index = KEYS[8]     -- the daemons' slots in use (score: builds, + down_load when down)
local worker = ARGV[1]         -- the caller (lease holder name)
local lease_ms = tonumber(ARGV[2])
local keep_ms = tonumber(ARGV[3])    -- how long a snapshot is kept
local job_prefix = ARGV[4]
local walk_max = tonumber(ARGV[5])   -- job hashes read at most per walk
local limit = tonumber(ARGV[6])      -- builds per daemon (the caller's BUILDQ_BUILDKIT_MAX_BUILDS)
local band = tonumber(ARGV[7])       -- the width of a state's band in the jobs index
local down_load = tonumber(ARGV[8])  -- what an open breaker adds to a daemon's load
local daemons = {unpack(ARGV, 9)}    -- the daemons of the caller's list
local holder = redis.call('GET', lease_key)
if holder and holder ~= worker then
  return {0, redis.call('GET', snapshot_key) or '', now}
end
redis.call('SET', lease_key, worker, 'PX', lease_ms)

local queues = {}
queues[queue] = redis.call('LLEN', queue)
queues[high_queue] = redis.call('LLEN', high_queue)

-- the oldest job still queued and due (a job in its retry backoff is not due): the queued band,
-- oldest first, up to the first such job
local oldest = nil
local read, offset = 0, 0
while oldest == nil and read < walk_max do
  local batch = redis.call('ZRANGEBYSCORE', jobs_index, 0, '(' .. band, 'WITHSCORES', 'LIMIT', offset, 100)
  if #batch == 0 then break end
  for i = 1, #batch, 2 do
    read = read + 1
    local h = redis.call('HMGET', job_prefix .. batch[i], 'state', 'phase')
    if h[1] == 'queued' and h[2] ~= 'retry_wait' then
      oldest = tonumber(batch[i + 1])
      break
    end
    if read >= walk_max then break end
  end
  offset = offset + 100
end
local oldest_age = 0
if oldest ~= nil and now / 1000 > oldest then oldest_age = now / 1000 - oldest end

-- jobs waiting for a daemon: members whose job is still queued in that phase
local waiting = 0
for _, job_id in ipairs(redis.call('ZRANGE', waiting_index, 0, walk_max - 1)) do
  local h = redis.call('HMGET', job_prefix .. job_id, 'state', 'phase')
  if h[1] == 'queued' and h[2] == 'waiting_for_daemon' then
    waiting = waiting + 1
  else
    redis.call('ZREM', waiting_index, job_id)
  end
end

local slots = {}
for _, daemon in ipairs(daemons) do
  slots[daemon] = math.fmod(tonumber(redis.call('ZSCORE', load_index, daemon) or '0'), down_load)
end

local snapshot = cjson.encode({
  at = now / 1000, by = worker, queues = queues, oldest_queued_s = oldest_age, slots = slots,
  limit = limit, workers = redis.call('ZCOUNT', workers, '(' .. now, '+inf'), waiting_for_daemon = waiting,
})
redis.call('SET', snapshot_key, snapshot, 'PX', keep_ms)
return {1, snapshot, now}
