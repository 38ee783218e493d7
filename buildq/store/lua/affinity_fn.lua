-- affine(key, first, token, ttl_ms, limit, prefix_len, avoid, wait) (needs prelude.lua's `now` and
-- `keep`): the daemon that last built this cache (string at `key`, '' when affinity is off), if it is
-- one of the slot sets KEYS[first..#KEYS] (the down-daemons hash at KEYS[first - 1]). Returns its
-- 1-based position among them (0: none remembered, or not configured) and what happened: 1 a slot
-- taken there (the token already holding one counts), 2 it is up but full and `wait` is '1' (nothing
-- taken: the caller waits for it), 0 it cannot be used now (down, avoided, or full without waiting).
local function affine(key, first, token, ttl_ms, limit, prefix_len, avoid, wait)
  if key == '' then return 0, 0 end
  local name = redis.call('GET', key)
  if not name then return 0, 0 end
  for i = first, #KEYS do
    if string.sub(KEYS[i], prefix_len + 1) == name then
      local at = i - first + 1
      if name == avoid or redis.call('HEXISTS', KEYS[first - 1], name) == 1 then return at, 0 end
      redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
      if redis.call('ZSCORE', KEYS[i], token) or redis.call('ZCARD', KEYS[i]) < limit then
        redis.call('ZADD', KEYS[i], now + ttl_ms, token)
        keep(KEYS[i])
        return at, 1
      end
      if wait == '1' then return at, 2 end
      return at, 0
    end
  end
  return 0, 0
end
