-- KEYS job hash, result, lease, queued index, unacked hash; ARGV job id -> 1 when pushed back.
-- A job still queued, never claimed, with no result, whose message is in no queue and not
-- unacknowledged, gets its message pushed back to its queue.
local h = redis.call('HMGET', KEYS[1], 'state', 'claims', 'msg', 'queue', 'tag')
if (not h[3]) or h[2] or h[1] ~= 'queued' then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 0
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 0
end
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if h[5] and redis.call('HEXISTS', KEYS[5], h[5]) == 1 then return 0 end
if redis.call('LPOS', h[4], h[3]) then return 0 end
redis.call('RPUSH', h[4], h[3])
return 1
