-- reject: the record of a job a worker found invalid (it claimed nothing, launched nothing). Written
-- only for the job's current delivery while it has no record and no live lease: a forged message
-- naming another job's id (its delivery id is not the job's), or a duplicate delivery on a
-- misconfigured worker, never ends or overwrites a job that another delivery owns.
local job_hash = KEYS[1]
local jobs_index = KEYS[2]     -- the recent jobs (score: enqueued_at + the band of `state`)
local record = ARGV[1]
local state = ARGV[2]
local job_id = ARGV[3]
local delivery = ARGV[4]       -- the delivery id of the rejected message
local done_channel = ARGV[5]
local ttl = tonumber(ARGV[6])
local band = tonumber(ARGV[7])   -- what `state` adds to a score in the jobs index
-- -> 1 stored | 0 nothing written
local h = read(job_hash, {'record', 'delivery', 'lease', 'lease_until', 'enqueued_at', 'slot', 'slot_load'})
if h.record then return 0 end
if h.lease and tonumber(h.lease_until or '0') > now then return 0 end
if h.delivery and h.delivery ~= delivery then return 0 end
local enqueued_at = h.enqueued_at or string.format('%.3f', now / 1000)
redis.call('HSET', job_hash, unpack(extend({'state', state, 'phase', 'done', 'record', record,
  'done_gen', '0', 'enqueued_at', enqueued_at}, give_back(h))))
redis.call('EXPIRE', job_hash, ttl)
redis.call('ZADD', jobs_index, tonumber(enqueued_at) + band, job_id)
redis.call('PUBLISH', done_channel, record)  -- the record itself: a waiter needs no read
return 1
