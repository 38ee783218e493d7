-- release: the holder of claim `gen` gives back its lease and slot without a record (an error
-- interrupted it, and kombu pushes the message back to the queue right after); the next claim
-- records the attempt as lost with `error` (the run in flight stays, with the error written in).
local job_hash = KEYS[1]
local jobs_index = KEYS[2]     -- the recent jobs (score enqueued_at while queued)
local gen = ARGV[1]
local error = ARGV[2]          -- what interrupted it ('' for nothing to say)
local job_id = ARGV[3]
-- -> 1 given back | 0 not ours any more
local h = read(job_hash, {'gen', 'done_gen', 'lease', 'slot', 'slot_load', 'running', 'enqueued_at'})
if h.done_gen or h.gen ~= gen or not h.lease then return 0 end
-- pushed now (by kombu, at the queue's tail): see the janitor (lost.lua)
local set = extend({'lease_until', 0, 'pushed_at', now, 'state', 'queued'}, give_back(h))
if h.running and error ~= '' then
  local run = cjson.decode(h.running)
  run['error'] = error
  extend(set, {'running', cjson.encode(run)})
end
redis.call('HSET', job_hash, unpack(set))
redis.call('HDEL', job_hash, 'lease')
redis.call('ZADD', jobs_index, tonumber(h.enqueued_at or '0'), job_id)
return 1
