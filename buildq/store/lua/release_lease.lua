-- KEYS[1] lease; ARGV token -> 1 deleted | 0 not ours
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
