-- prelude (part of every script that reads the clock or keeps slot sets):
--   now        milliseconds on the Redis server's clock (the one clock every worker shares)
--   keep(key)  a slot set's TTL outlives its last member by a second (idle daemons leave no keys)
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function keep(key)
  local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if top[2] then redis.call('PEXPIRE', key, math.max(1, tonumber(top[2]) - now + 1000)) end
end
