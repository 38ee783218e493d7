-- breaker: open (`down`) or close (`up`) a daemon's circuit breaker, moving the daemon in every load
-- index (an open breaker adds DOWN_LOAD: never the least loaded daemon with room). Each transition
-- is made by one call only: the one that sees it happen.
local down_hash = KEYS[1]
local up_hash = KEYS[2]
local error_hash = KEYS[3]
local hold_key = KEYS[4]       -- set while the breaker must stay open whatever a probe says
local loads = KEYS[5]          -- the load indexes (their names are the keys not passed in KEYS)
local action = ARGV[1]         -- down | up
local daemon = ARGV[2]
local at = ARGV[3]             -- epoch s
local error = ARGV[4]          -- down: the error that opened it
local hold_ms = tonumber(ARGV[5])
-- -> down: 1 opened by this call, 0 it was open | up: when it went down, '' when it was not down
local function move(by)
  for _, index in ipairs(redis.call('SMEMBERS', loads)) do
    redis.call('ZADD', index, 'XX', 'INCR', by, daemon)
  end
end
if action == 'down' then
  local opened = redis.call('HSETNX', down_hash, daemon, at)
  redis.call('HSET', error_hash, daemon, error)
  if hold_ms > 0 then redis.call('SET', hold_key, '1', 'PX', hold_ms) end
  if opened == 1 then move(DOWN_LOAD) end
  return opened
end
local since = redis.call('HGET', down_hash, daemon)
if not since then return '' end
redis.call('HDEL', down_hash, daemon)
redis.call('HSET', up_hash, daemon, at)
move(-DOWN_LOAD)
return since
