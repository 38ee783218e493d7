-- acquire_any(first, token, ttl_ms, limit) (needs prelude.lua's `now` and `keep`): take a slot for
-- `token` on one of the slot sets KEYS[first..#KEYS] (preference order); returns its 1-based
-- position among them, 0 if all are full. A set where the token already holds a slot wins (retry
-- after a lost reply); otherwise the least loaded one with room, the earliest among equals.
local function acquire_any(first, token, ttl_ms, limit)
  local best, best_n = 0, limit
  for i = first, #KEYS do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    if redis.call('ZSCORE', KEYS[i], token) then
      best = i
      break
    end
    local n = redis.call('ZCARD', KEYS[i])
    if n < best_n then best, best_n = i, n end
  end
  if best == 0 then return 0 end
  redis.call('ZADD', KEYS[best], now + ttl_ms, token)
  keep(KEYS[best])
  return best - first + 1
end
