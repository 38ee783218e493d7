-- KEYS result, job hash, log stream, lease, slot set, queued index, affinity key ('' for none),
--      baseline list ('' for none)
-- ARGV record, state, result ttl, done channel, token, give back the slot (1|0), log maxlen, log ttl,
--      job id, daemon to remember for the cache ('' for none), its ttl, baseline entry ('' for none),
--      baseline length, baseline ttl, then the log's last entries as (attempt, kind, line) triples
-- -> 1 stored | 0 dropped: the lease is another delivery's, or it expired and the job has a result
local holder = redis.call('GET', KEYS[4])
if holder and holder ~= ARGV[5] then return 0 end
if (not holder) and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 15, #ARGV, 3 do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'a', ARGV[i], 'k', ARGV[i + 1], 'l', ARGV[i + 2])
end
if #ARGV >= 15 then redis.call('EXPIRE', KEYS[3], ARGV[8]) end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('HSET', KEYS[2], 'state', ARGV[2], 'phase', 'done')
redis.call('HDEL', KEYS[2], 'msg', 'tag')
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[6], ARGV[9])
if ARGV[6] == '1' then redis.call('ZREM', KEYS[5], ARGV[5]) end
if ARGV[10] ~= '' then redis.call('SET', KEYS[7], ARGV[10], 'EX', ARGV[11]) end
if ARGV[12] ~= '' then
  redis.call('LPUSH', KEYS[8], ARGV[12])
  redis.call('LTRIM', KEYS[8], 0, tonumber(ARGV[13]) - 1)
  redis.call('EXPIRE', KEYS[8], ARGV[14])
end
if holder then redis.call('DEL', KEYS[4]) end
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
