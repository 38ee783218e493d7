-- KEYS result, lease, job hash, queued index, cancel flag, affinity key ('' when off), down-daemons
-- hash, slot sets (preference order, maybe none)
-- ARGV job id, token, lease ttl ms, slot limit, slot key prefix length, daemon to avoid ('' for none),
--      wait for a full remembered daemon (1|0), job hash ttl s
-- -> {0, record} finished | {1} lease held elsewhere
--    | {2, earlier claims, cancelled, slot position, remembered daemon's position, it is full (1|0)}
-- The janitor's copy of the message (job hash `msg`, index entry) stays until the job finishes.
local existing = redis.call('GET', KEYS[1])
if existing then return {0, existing} end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return {1} end
local earlier = redis.call('HINCRBY', KEYS[3], 'claims', 1) - 1
redis.call('EXPIRE', KEYS[3], ARGV[8])
if redis.call('EXISTS', KEYS[5]) == 1 then return {2, earlier, 1, 0, 0, 0} end
local ttl, limit, prefix_len = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local at, got = affine(KEYS[6], 8, ARGV[2], ttl, limit, prefix_len, ARGV[6], ARGV[7])
if got == 1 then return {2, earlier, 0, at, at, 0} end
if got == 2 then return {2, earlier, 0, 0, at, 1} end
return {2, earlier, 0, acquire_any(8, ARGV[2], ttl, limit, prefix_len, ARGV[6]), at, 0}
