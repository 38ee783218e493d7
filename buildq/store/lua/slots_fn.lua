-- slots (part): the per-daemon build slots. A daemon's slot set holds one member per build on it
-- (the claim token), scored by its expiry on the server clock; expired members are dropped first.
-- A daemon's name is its slot key without the first `prefix_len` characters; `down` is the hash of
-- daemons whose circuit breaker is open (skipped).

-- take_any(sets, down, token, ttl_ms, limit, prefix_len, avoid): a slot on the least loaded daemon
-- that is up and has room (the earliest among equals; a set where `token` already holds a slot wins:
-- a retry after a lost reply); `avoid` (a daemon name or '') only when no other has room.
-- -> its 1-based position in `sets`, 0 when every daemon that is up is full
local function take_any(sets, down, token, ttl_ms, limit, prefix_len, avoid)
  local best, best_n, spare, spare_n = 0, limit, 0, limit
  for i, set in ipairs(sets) do
    local daemon = string.sub(set, prefix_len + 1)
    if redis.call('HEXISTS', down, daemon) == 0 then
      redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
      if redis.call('ZSCORE', set, token) then
        best = i
        break
      end
      local n = redis.call('ZCARD', set)
      if daemon == avoid then
        if n < spare_n then spare, spare_n = i, n end
      elseif n < best_n then
        best, best_n = i, n
      end
    end
  end
  if best == 0 then best = spare end
  if best == 0 then return 0 end
  redis.call('ZADD', sets[best], now + ttl_ms, token)
  keep(sets[best])
  return best
end

-- take_remembered(affinity_key, sets, down, token, ttl_ms, limit, prefix_len, avoid, wait): a slot on
-- the daemon that last built this cache (the string at `affinity_key`; '' when affinity is off).
-- -> its position in `sets` (0: none remembered, or no longer configured) and what happened: 1 a slot
--    taken there, 2 it is up but full and `wait` is '1' (nothing taken: the caller waits for it),
--    0 it cannot be used now (down, avoided, or full without waiting)
local function take_remembered(affinity_key, sets, down, token, ttl_ms, limit, prefix_len, avoid, wait)
  if affinity_key == '' then return 0, 0 end
  local name = redis.call('GET', affinity_key)
  if not name then return 0, 0 end
  for i, set in ipairs(sets) do
    if string.sub(set, prefix_len + 1) == name then
      if name == avoid or redis.call('HEXISTS', down, name) == 1 then return i, 0 end
      redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
      if redis.call('ZSCORE', set, token) or redis.call('ZCARD', set) < limit then
        redis.call('ZADD', set, now + ttl_ms, token)
        keep(set)
        return i, 1
      end
      if wait == '1' then return i, 2 end
      return i, 0
    end
  end
  return 0, 0
end
