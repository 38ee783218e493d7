-- acquire_any(first, token, ttl_ms, limit, prefix_len, avoid) (needs prelude.lua's `now` and `keep`):
-- take a slot for `token` on one of the slot sets KEYS[first..#KEYS] (preference order), skipping
-- daemons whose circuit breaker is open (fields of the hash KEYS[first - 1]; a daemon's name is its
-- slot key without the first `prefix_len` characters). Returns its 1-based position among them, 0
-- if every daemon that is up is full. A set where the token already holds a slot wins (retry after
-- a lost reply); otherwise the least loaded one with room, the earliest among equals; `avoid` (a
-- daemon name, or '') is taken only when no other daemon has room.
local function acquire_any(first, token, ttl_ms, limit, prefix_len, avoid)
  local down = KEYS[first - 1]
  local best, best_n, spare, spare_n = 0, limit, 0, limit
  for i = first, #KEYS do
    local daemon = string.sub(KEYS[i], prefix_len + 1)
    if redis.call('HEXISTS', down, daemon) == 0 then
      redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
      if redis.call('ZSCORE', KEYS[i], token) then
        best = i
        break
      end
      local n = redis.call('ZCARD', KEYS[i])
      if daemon == avoid then
        if n < spare_n then spare, spare_n = i, n end
      elseif n < best_n then
        best, best_n = i, n
      end
    end
  end
  if best == 0 then best = spare end
  if best == 0 then return 0 end
  redis.call('ZADD', KEYS[best], now + ttl_ms, token)
  keep(KEYS[best])
  return best - first + 1
end
