-- cancel: ask for a job's cancellation: a queued job never starts, a running one is killed (every
-- pool process hears it on `cancels`; the lease renewal answers it too). A job that has its record
-- is left alone; one not seen yet is remembered (its first claim finds it cancelled).
local job_hash = KEYS[1]
local job_id = ARGV[1]
local reason = ARGV[2]         -- what the record will say ('1': asked by a user)
local cancels = ARGV[3]        -- the channel every pool process listens to
local ttl = tonumber(ARGV[4])
-- -> 1 asked | 0 the job has its record already
local h = redis.call('HMGET', job_hash, 'record', 'enqueued_at')
if h[1] then return 0 end
redis.call('HSET', job_hash, 'cancel', reason)
if not h[2] then redis.call('EXPIRE', job_hash, ttl) end
redis.call('PUBLISH', cancels, job_id)
return 1
