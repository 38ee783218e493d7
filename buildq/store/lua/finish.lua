-- KEYS result, job hash, log stream, lease, slot set, affinity key
-- ARGV record, state, result ttl, done channel, token, give back the slot (1|0), log maxlen, log ttl,
--      daemon to remember for the cache ('' for none), its ttl, then the log's last entries as
--      (attempt, kind, line) triples
for i = 11, #ARGV, 3 do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'a', ARGV[i], 'k', ARGV[i + 1], 'l', ARGV[i + 2])
end
if #ARGV >= 11 then redis.call('EXPIRE', KEYS[3], ARGV[8]) end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('HSET', KEYS[2], 'state', ARGV[2], 'phase', 'done')
redis.call('EXPIRE', KEYS[2], ARGV[3])
if ARGV[6] == '1' then redis.call('ZREM', KEYS[5], ARGV[5]) end
if ARGV[9] ~= '' then redis.call('SET', KEYS[6], ARGV[9], 'EX', ARGV[10]) end
if redis.call('GET', KEYS[4]) == ARGV[5] then redis.call('DEL', KEYS[4]) end
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
