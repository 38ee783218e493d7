-- dead: a run of claim generation `gen` is known to be over (its supervisor killed it when it was
-- fenced out, or its host's reaper killed it), so a takeover waiting for it may launch. Only ever
-- moves up.
local job_hash = KEYS[1]
local gen = tonumber(ARGV[1])
-- -> the highest generation known dead
local known = tonumber(redis.call('HGET', job_hash, 'dead_gen') or '0')
if gen > known and redis.call('EXISTS', job_hash) == 1 then
  redis.call('HSET', job_hash, 'dead_gen', gen)
  return gen
end
return known
