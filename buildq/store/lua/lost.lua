-- lost: which of these queued jobs' messages the broker lost (a Redis restart between kombu's
-- BRPOP and its unacked record, or writes a restart did not keep). A job's current message is lost
-- when the job is still queued (no record, no live lease), its delivery tag is not among kombu's
-- delivered-and-unacknowledged messages, and it is not in its queue either: it was stamped before
-- the queue's head (queue_fn.lua) by more than `margin_ms` (the moment between a release and
-- kombu's push). O(1) per job. A job whose hash is gone leaves the index.
local unacked = KEYS[1]        -- kombu's hash of delivered, unacknowledged messages
local jobs_index = KEYS[2]
local job_hashes = {unpack(KEYS, 3)}  -- one per job id, in the same order
local margin_ms = tonumber(ARGV[1])
local job_prefix = ARGV[2]     -- a job hash's name without its job id
local job_ids = {unpack(ARGV, 3)}
-- -> {job id, pushed_at} pairs, flattened, of the jobs whose message is lost
local out = {}
for i, job_hash in ipairs(job_hashes) do
  local h = redis.call('HMGET', job_hash, 'record', 'lease', 'lease_until', 'queue', 'tag', 'pushed_at')
  if not h[4] or h[1] then
    redis.call('ZREM', jobs_index, job_ids[i])
  elseif not (h[2] and tonumber(h[3] or '0') > now) and h[6]
      and (not h[5] or redis.call('HEXISTS', unacked, h[5]) == 0)
      and tonumber(h[6]) + margin_ms < head_stamp(h[4], job_prefix) then
    out[#out + 1] = job_ids[i]
    out[#out + 1] = h[6]
  end
end
return out
