-- KEYS unacked hash, unacked index, lease, result, job hash; ARGV tag, queue -> 1 when put back.
-- A job waiting for its retry has handed over to a new message: its old one is being acked.
local payload = redis.call('HGET', KEYS[1], ARGV[1])
if not payload then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
if redis.call('HGET', KEYS[5], 'phase') == 'retry_wait' then return 0 end
local entry = cjson.decode(payload)
redis.call('RPUSH', ARGV[2], cjson.encode(entry[1]))
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
