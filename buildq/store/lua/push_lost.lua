-- push_lost: put back a message the broker lost (found by lost.lua), made again by the caller
-- from the job hash: only while it is lost the same way (the same delivery and stamp, no live
-- lease, no record, not delivered since). It goes to the queue's head (queue_fn.lua).
local job_hash = KEYS[1]
local unacked = KEYS[2]
local queue = KEYS[3]
local message = ARGV[1]
local delivery = ARGV[2]
local pushed_at = ARGV[3]      -- the stamp lost.lua saw
local job_prefix = ARGV[4]
-- -> 1 pushed back | 0 not lost any more
local h = redis.call('HMGET', job_hash, 'record', 'lease', 'lease_until', 'delivery', 'tag', 'pushed_at')
if h[1] or (h[2] and tonumber(h[3] or '0') > now) then return 0 end
if h[4] ~= delivery or h[6] ~= pushed_at then return 0 end
if h[5] and redis.call('HEXISTS', unacked, h[5]) == 1 then return 0 end
put_back(queue, job_prefix, job_hash, message, tonumber(pushed_at))
return 1
