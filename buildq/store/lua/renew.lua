-- renew: the holder of claim `gen` keeps its lease while buildctl runs, and says the phase its
-- build is in. A lease that expired is taken again only while the generation is still `gen`
-- (nobody claimed the job since); once another delivery claimed it, or the job has its record,
-- the old holder is fenced out for good and must kill its buildctl. Nothing is written then.
local job_hash = KEYS[1]
local gen = ARGV[1]
local ttl_ms = tonumber(ARGV[2])
local phase = ARGV[3]          -- the build's phase now ('' to leave it as it is)
-- -> 0 fenced out | 1 renewed | 2 renewed, and a cancel was requested
local h = redis.call('HMGET', job_hash, 'gen', 'done_gen', 'cancel')
if h[2] or h[1] ~= gen then return 0 end
if phase ~= '' then
  redis.call('HSET', job_hash, 'lease_until', now + ttl_ms, 'phase', phase)
else
  redis.call('HSET', job_hash, 'lease_until', now + ttl_ms)
end
if h[3] then return 2 end
return 1
