-- progress: the holder of claim `gen` writes what its build is doing into the job hash (running,
-- phase, attempt, worker, daemon, the run in flight). Nothing is written once another delivery
-- claimed the job or it finished: a late progress write never covers the final state.
local job_hash = KEYS[1]
local result_key = KEYS[2]
local gen = ARGV[1]
local ttl = tonumber(ARGV[2])
local fields = {unpack(ARGV, 3)}  -- field, value pairs
-- -> 1 written | 0 not ours any more
if redis.call('EXISTS', result_key) == 1 or redis.call('HGET', job_hash, 'gen') ~= gen then return 0 end
redis.call('HSET', job_hash, unpack(fields))
redis.call('EXPIRE', job_hash, ttl)
return 1
