-- Put a claimed job back on its queue (a retry, or a wait for a daemon) and give back its claim, at
-- once: the new message is published before the lease goes, so no moment has neither.
-- KEYS queue, job hash, lease, slot set, queued index
-- ARGV message, delivery tag, token, job id, when it is due (epoch s), phase, job hash ttl s,
--      give back the slot (1|0)
-- -> 1 | 0 the lease is another delivery's (nothing is published)
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[3] then return 0 end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'msg', ARGV[1], 'tag', ARGV[2], 'state', 'queued', 'phase', ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[7])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[4])
if holder then redis.call('DEL', KEYS[3]) end
if ARGV[8] == '1' then redis.call('ZREM', KEYS[4], ARGV[3]) end
return 1
