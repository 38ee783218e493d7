-- renew: the holder of claim `gen` keeps its lease and its daemon slot while buildctl runs. A lease
-- that expired is taken again only while the generation is still `gen` (nobody claimed the job
-- since); once another delivery claimed it, or the job has a result, the old holder is fenced out
-- for good and must kill its buildctl.
local lease_key = KEYS[1]
local job_hash = KEYS[2]
local result_key = KEYS[3]
local cancel_key = KEYS[4]
local slot_set = KEYS[5]       -- '' when the build holds no slot
local token = ARGV[1]
local gen = ARGV[2]
local ttl_ms = tonumber(ARGV[3])
-- -> 0 fenced out | 1 renewed | 2 renewed, and a cancel was requested
if not still_holds(job_hash, result_key, lease_key, token, gen) then return 0 end
redis.call('SET', lease_key, token, 'PX', ttl_ms)
if slot_set ~= '' then
  redis.call('ZADD', slot_set, now + ttl_ms, token)
  keep(slot_set)
end
if redis.call('EXISTS', cancel_key) == 1 then return 2 end
return 1
