-- KEYS[1] lease; ARGV token, ttl ms -> 1 extended | 2 taken again (it had expired, nobody held it) |
-- 0 held by another delivery
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
