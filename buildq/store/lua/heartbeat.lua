-- heartbeat: a worker's main process says it lives (every few seconds), for itself and for the
-- place its runs can be killed from (its domain: a host's state folder, a Docker engine), and names
-- the queues it consumes (the janitor reads their heads). Members are scored by their expiry on the
-- server clock; expired ones are dropped here.
local workers = KEYS[1]        -- live workers (sorted set, score: expiry ms)
local domains = KEYS[2]        -- live domains (sorted set, score: expiry ms)
local epoch = KEYS[3]          -- when this Redis's buildq data began (set once; a data loss resets it)
local queues = KEYS[4]         -- the queues workers consume (set)
local worker = ARGV[1]
local domain = ARGV[2]
local ttl_ms = tonumber(ARGV[3])
local names = {unpack(ARGV, 4)}  -- the queues this worker consumes
-- -> the server clock (ms)
redis.call('ZREMRANGEBYSCORE', workers, '-inf', now)
redis.call('ZREMRANGEBYSCORE', domains, '-inf', now)
redis.call('ZADD', workers, now + ttl_ms, worker)
redis.call('ZADD', domains, now + ttl_ms, domain)
redis.call('SET', epoch, string.format('%.3f', now / 1000), 'NX')
if #names > 0 then redis.call('SADD', queues, unpack(names)) end
return now
