-- load (part): a load index is a sorted set of daemons scored by the builds they run (the claims
-- holding a slot on them); an open circuit breaker adds DOWN_LOAD, so a down daemon never has room.

local DOWN_LOAD = 1000000

-- least_loaded(load_index, limit, avoid): the least loaded daemon with fewer than `limit` builds,
-- `avoid` only when no other has room; '' when none has. O(log n): it reads two members.
local function least_loaded(load_index, limit, avoid)
  local c = redis.call('ZRANGEBYSCORE', load_index, '-inf', '(' .. limit, 'LIMIT', 0, 2)
  if c[1] and c[1] == avoid and c[2] then return c[2] end
  return c[1] or ''
end

-- take(load_index, daemon): one more build on `daemon` -> the job hash fields that say so
local function take(load_index, daemon)
  redis.call('ZINCRBY', load_index, 1, daemon)
  return {'slot', daemon, 'slot_load', load_index}
end
