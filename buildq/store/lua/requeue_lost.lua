-- KEYS job hash, result, lease, queued index, unacked hash; ARGV job id -> 1 when pushed back.
-- The job has no result, nobody holds its lease, and the message buildq keeps for it (the last one
-- sent) is neither in its queue nor delivered-and-unacknowledged: the broker lost it (a Redis
-- restart between BRPOP and kombu's unacked record, or writes the restart did not keep).
local h = redis.call('HMGET', KEYS[1], 'msg', 'queue', 'tag')
if (not h[1]) or redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 0
end
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if h[3] and redis.call('HEXISTS', KEYS[5], h[3]) == 1 then return 0 end
if redis.call('LPOS', h[2], h[1]) then return 0 end
redis.call('RPUSH', h[2], h[1])
return 1
