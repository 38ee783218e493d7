-- KEYS result, job hash, log stream, lease, slot set, baseline list
-- ARGV record, state, result ttl, done channel, token, give back the slot (1|0), log maxlen, log ttl,
--      baseline entry ('' for none), baseline length, baseline ttl,
--      then the log's last entries as (attempt, kind, line) triples
for i = 12, #ARGV, 3 do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'a', ARGV[i], 'k', ARGV[i + 1], 'l', ARGV[i + 2])
end
if #ARGV >= 12 then redis.call('EXPIRE', KEYS[3], ARGV[8]) end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('HSET', KEYS[2], 'state', ARGV[2], 'phase', 'done')
redis.call('EXPIRE', KEYS[2], ARGV[3])
if ARGV[6] == '1' then redis.call('ZREM', KEYS[5], ARGV[5]) end
if redis.call('GET', KEYS[4]) == ARGV[5] then redis.call('DEL', KEYS[4]) end
if ARGV[9] ~= '' then
  redis.call('LPUSH', KEYS[6], ARGV[9])
  redis.call('LTRIM', KEYS[6], 0, tonumber(ARGV[10]) - 1)
  redis.call('EXPIRE', KEYS[6], ARGV[11])
end
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
