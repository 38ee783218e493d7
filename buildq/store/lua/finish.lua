-- finish: the holder of claim `gen` stores the job's final record and ends its claim, in one step:
-- the log's last lines (one stream entry; the stream trimmed to `log_maxlen`), the record and the
-- final state in the job hash, the job moved to its final state's band of the index, the slot
-- given back, waiters told; for a build that succeeded also the daemon to remember for its cache,
-- and its entry in its repository's baseline (kept between N and 2N entries, trimmed and its TTL
-- renewed when it passes 2N). With an archive the job's hash is kept `keep_s` from now (the record
-- goes to the archive next). A holder that was fenced out stores nothing: the record of the
-- delivery that owns the job stands. The cache ref's export lease the build held (if any) is given
-- back first, fenced by its own holder, whatever the claim's fence says (export_fn.lua).
local job_hash = KEYS[1]
local jobs_index = KEYS[2]     -- the recent jobs (score: enqueued_at + the band of `state`)
local log_stream = KEYS[3]
local affinity_key = KEYS[4]   -- '' when there is nothing to remember
local baseline_list = KEYS[5]  -- '' when the build adds nothing to a baseline
local export_lease = KEYS[6]   -- export:<cache key> to give back; '' when the build held none
local record = ARGV[1]         -- the final record (JSON)
local state = ARGV[2]          -- succeeded | failed | cancelled
local gen = ARGV[3]
local job_id = ARGV[4]
local done_channel = ARGV[5]
local daemon = ARGV[6]         -- the daemon to remember for the cache, if it succeeded ('' for none)
local remember_ttl = tonumber(ARGV[7])
local baseline_entry = ARGV[8]
local baseline_n = tonumber(ARGV[9])
local baseline_ttl = tonumber(ARGV[10])
local log_trim = ARGV[11]      -- '=' exactly or '~' about `log_maxlen` entries
local log_maxlen = ARGV[12]
local log_ttl = tonumber(ARGV[13])  -- 0: leave the stream's TTL as it is
local log_attempt = ARGV[14]
local log_lines = ARGV[15]     -- the log's last lines, one entry (logs.py); '' for none (archived)
local band = tonumber(ARGV[16])  -- what `state` adds to a score in the jobs index
local keep_s = tonumber(ARGV[17])  -- how long the finished job's hash stays (0: its TTL as it is)
local export_order = ARGV[18]  -- the build's order (enqueued_at) for the export lease
local exported = ARGV[19]      -- '1' when its cache export completed
-- -> 1 stored | 2 stored already by this very claim (its reply was lost) | 0 fenced out (nothing written)
if export_lease ~= '' then release_export(export_lease, job_id, export_order, exported) end
local h = read(job_hash, {'gen', 'done_gen', 'slot', 'slot_load', 'enqueued_at'})
if h.done_gen then
  if h.done_gen == gen then return 2 end
  return 0
end
if h.gen ~= gen then return 0 end
if log_lines ~= '' then
  redis.call('XADD', log_stream, 'MAXLEN', log_trim, log_maxlen, '*', 'a', log_attempt, 'l', log_lines)
end
if log_ttl > 0 then redis.call('EXPIRE', log_stream, log_ttl) end
redis.call('HSET', job_hash, unpack(extend({'state', state, 'phase', 'done', 'record', record,
  'done_gen', gen, 'lease_until', 0}, give_back(h))))
redis.call('ZADD', jobs_index, tonumber(h.enqueued_at or '0') + band, job_id)
if keep_s > 0 then redis.call('EXPIRE', job_hash, keep_s) end
redis.call('PUBLISH', done_channel, record)  -- the record itself: a waiter needs no read
if state == 'succeeded' and affinity_key ~= '' and daemon ~= '' then
  redis.call('SET', affinity_key, daemon, 'EX', remember_ttl)
end
if state == 'succeeded' and baseline_list ~= '' then
  local n = redis.call('LPUSH', baseline_list, baseline_entry)
  if n == 1 or n > 2 * baseline_n then
    redis.call('LTRIM', baseline_list, 0, baseline_n - 1)
    redis.call('EXPIRE', baseline_list, baseline_ttl)
  end
end
return 1
