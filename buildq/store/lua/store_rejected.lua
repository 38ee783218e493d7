-- The record of a job this worker rejected, unless the job has a result or a live delivery.
-- KEYS result, job hash, lease, queued index; ARGV record, state, ttl, done channel, job id
-- -> 1 stored | 0 nothing written
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('HSET', KEYS[2], 'state', ARGV[2], 'phase', 'done')
redis.call('HDEL', KEYS[2], 'msg', 'tag')
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[5])
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
