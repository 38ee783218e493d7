-- reject: the record of a job a worker found invalid (it claimed nothing, launched nothing). Written
-- only for the job's current delivery while it has no result and no live lease: a forged message
-- naming another job's id (its delivery id is not the job's), or a duplicate delivery on a
-- misconfigured worker, never ends or overwrites a job that another delivery owns.
local result_key = KEYS[1]
local job_hash = KEYS[2]
local lease_key = KEYS[3]
local queued_index = KEYS[4]
local record = ARGV[1]
local state = ARGV[2]
local job_id = ARGV[3]
local delivery = ARGV[4]       -- the delivery id of the rejected message
local done_channel = ARGV[5]
local ttl = tonumber(ARGV[6])
-- -> 1 stored | 0 nothing written
if redis.call('EXISTS', result_key) == 1 or redis.call('EXISTS', lease_key) == 1 then return 0 end
local current = redis.call('HGET', job_hash, 'delivery')
if current and current ~= delivery then return 0 end
store_result(result_key, job_hash, queued_index, done_channel, job_id, record, state, ttl)
return 1
