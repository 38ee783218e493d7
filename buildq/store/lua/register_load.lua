-- register_load: a worker's daemon list gets its load index (at worker start; again by the janitor,
-- which also corrects a daemon whose open breaker the index does not show, or the other way round):
-- each daemon of the list is a member (a new one with DOWN_LOAD while its breaker is open), and the
-- index is in the set of indexes the breakers update.
local load_index = KEYS[1]
local loads = KEYS[2]          -- every load index in use
local down_hash = KEYS[3]      -- the open breakers
local daemons = {unpack(ARGV, 1)}
-- -> the daemons whose load was corrected
redis.call('SADD', loads, load_index)
local fixed = {}
for _, daemon in ipairs(daemons) do
  local down = redis.call('HEXISTS', down_hash, daemon) == 1
  local load = redis.call('ZSCORE', load_index, daemon)
  if not load then
    redis.call('ZADD', load_index, down and DOWN_LOAD or 0, daemon)
  elseif down ~= (tonumber(load) >= DOWN_LOAD / 2) then
    redis.call('ZINCRBY', load_index, down and DOWN_LOAD or -DOWN_LOAD, daemon)
    fixed[#fixed + 1] = daemon
  end
end
return fixed
