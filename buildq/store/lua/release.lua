-- release: the holder of claim `gen` gives back its lease and slot without a result (an error
-- interrupted it); the janitor or the broker brings the job back, and the next claim records the
-- attempt as lost with `error` (the run in flight stays, with the error written into it).
local lease_key = KEYS[1]
local job_hash = KEYS[2]
local slot_set = KEYS[3]       -- '' when the claim holds no slot
local token = ARGV[1]
local gen = ARGV[2]
local error = ARGV[3]          -- what interrupted it ('' for nothing to say)
-- -> 1 given back | 0 not ours any more
if slot_set ~= '' then redis.call('ZREM', slot_set, token) end
if redis.call('GET', lease_key) ~= token or redis.call('HGET', job_hash, 'gen') ~= gen then return 0 end
local running = redis.call('HGET', job_hash, 'running')
if running and error ~= '' then
  local run = cjson.decode(running)
  run['error'] = error
  redis.call('HSET', job_hash, 'running', cjson.encode(run))
end
redis.call('DEL', lease_key)
return 1
