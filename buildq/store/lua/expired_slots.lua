-- expired_slots: give back the daemon slots of claims whose lease ran out more than `grace_ms` ago
-- (their holder died, or stalled and was fenced out): their daemon counts them no more. The lease
-- fields stay (a takeover claim reads them); only the slot goes. A job whose hash is gone leaves
-- the index.
local jobs_index = KEYS[1]
local job_hashes = {unpack(KEYS, 2)}  -- claimed jobs, one per job id
local grace_ms = tonumber(ARGV[1])
local job_ids = {unpack(ARGV, 2)}
-- -> the job ids whose slot was given back
local out = {}
for i, job_hash in ipairs(job_hashes) do
  local h = read(job_hash, {'gen', 'done_gen', 'lease_until', 'slot', 'slot_load'})
  if not h.gen and not h.done_gen then
    redis.call('ZREM', jobs_index, job_ids[i])
  elseif h.slot and h.slot ~= '' and (h.done_gen or tonumber(h.lease_until or '0') + grace_ms < now) then
    redis.call('HSET', job_hash, unpack(give_back(h)))
    out[#out + 1] = job_ids[i]
  end
end
return out
