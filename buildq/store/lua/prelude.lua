-- prelude (part of every script that reads the clock):
--   now        milliseconds on the Redis server's clock (the one clock every worker shares)
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
