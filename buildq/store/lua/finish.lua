-- finish: the holder of claim `gen` stores the job's final record and ends its claim, in one step:
-- the log's last entries, the record and the final state (the shared result block), the lease and
-- the daemon slot given back; for a build that succeeded also the daemon it ran on, remembered for
-- its cache, and its entry in its repository's baseline. A holder that was fenced out stores
-- nothing: the record of the delivery that owns the job stands.
local result_key = KEYS[1]
local job_hash = KEYS[2]
local lease_key = KEYS[3]
local slot_set = KEYS[4]       -- '' when the claim holds no slot
local queued_index = KEYS[5]
local log_stream = KEYS[6]
local affinity_key = KEYS[7]   -- '' when there is nothing to remember
local baseline_list = KEYS[8]  -- '' when the build adds nothing to a baseline
local record = ARGV[1]         -- the final record (JSON)
local state = ARGV[2]          -- succeeded | failed | cancelled
local token = ARGV[3]
local gen = ARGV[4]
local job_id = ARGV[5]
local done_channel = ARGV[6]
local ttl = tonumber(ARGV[7])
local daemon = ARGV[8]         -- the daemon of the last attempt ('' for none)
local remember_ttl = tonumber(ARGV[9])
local baseline_entry = ARGV[10]
local baseline_n = tonumber(ARGV[11])
local baseline_ttl = tonumber(ARGV[12])
local log_maxlen = ARGV[13]
local log_ttl = tonumber(ARGV[14])
local log_entries = {unpack(ARGV, 15)}  -- the log's last entries, (attempt, kind, line) triples
-- -> 1 stored | 2 stored already by this very claim (its reply was lost) | 0 fenced out (nothing written)
if redis.call('EXISTS', result_key) == 1 and redis.call('HGET', job_hash, 'done_gen') == gen then return 2 end
if not still_holds(job_hash, result_key, lease_key, token, gen) then return 0 end
for i = 1, #log_entries, 3 do
  redis.call('XADD', log_stream, 'MAXLEN', '~', log_maxlen, '*',
    'a', log_entries[i], 'k', log_entries[i + 1], 'l', log_entries[i + 2])
end
if #log_entries > 0 then redis.call('EXPIRE', log_stream, log_ttl) end
store_result(result_key, job_hash, queued_index, done_channel, job_id, record, state, ttl)
redis.call('HSET', job_hash, 'done_gen', gen)
if state == 'succeeded' and affinity_key ~= '' and daemon ~= '' then
  redis.call('SET', affinity_key, daemon, 'EX', remember_ttl)
end
if state == 'succeeded' and baseline_list ~= '' then
  redis.call('LPUSH', baseline_list, baseline_entry)
  redis.call('LTRIM', baseline_list, 0, baseline_n - 1)
  redis.call('EXPIRE', baseline_list, baseline_ttl)
end
redis.call('DEL', lease_key)
if slot_set ~= '' then redis.call('ZREM', slot_set, token) end
return 1
