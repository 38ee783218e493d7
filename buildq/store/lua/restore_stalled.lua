-- restore_stalled: put back delivered build messages whose worker is gone (killed, or cut off from
-- Redis when Celery tried to hand them back): still unacknowledged while their job has no live
-- lease and no record. Celery's own restore waits for the visibility timeout (hours). A message
-- waiting out a retry's backoff (an ETA) is held by the worker that received it (`held_by`, written
-- when it was received): it is put back only once that worker's heartbeat is gone — or, when
-- nobody said who holds it, once its ETA is more than `grace_ms` past. A batch of entries per call;
-- each goes back to its queue's head (queue_fn.lua).
local unacked = KEYS[1]        -- kombu's hash of delivered, unacknowledged messages
local unacked_index = KEYS[2]  -- their delivery times
local workers = KEYS[3]        -- live workers (heartbeats: expiry ms on the server clock)
local job_hashes = {unpack(KEYS, 4)}  -- one per entry, in the order of `entries`
local grace_ms = tonumber(ARGV[1])
local job_prefix = ARGV[2]     -- a job hash's name without its job id (queue_fn.lua)
local entries = {unpack(ARGV, 3)}     -- (tag, queue, ETA ms on the server clock or 0) per entry
-- -> the positions (1-based) of the entries put back
local out = {}
for i, job_hash in ipairs(job_hashes) do
  local tag, queue, eta_ms = entries[3 * i - 2], entries[3 * i - 1], tonumber(entries[3 * i])
  local payload = redis.call('HGET', unacked, tag)
  local h = redis.call('HMGET', job_hash, 'record', 'lease', 'lease_until', 'held_by', 'pushed_at')
  if payload and not h[1] and not (h[2] and tonumber(h[3] or '0') > now) then
    local held = false
    if eta_ms > 0 then
      if h[4] then
        local alive = redis.call('ZSCORE', workers, h[4])
        held = alive and tonumber(alive) > now
      else
        held = now < eta_ms + grace_ms
      end
    end
    if not held then
      local entry = cjson.decode(payload)
      put_back(queue, job_prefix, job_hash, cjson.encode(entry[1]), h[5] and tonumber(h[5]))
      redis.call('HDEL', unacked, tag)
      redis.call('ZREM', unacked_index, tag)
      if h[4] then redis.call('HDEL', job_hash, 'held_by') end
      out[#out + 1] = i
    end
  end
end
return out
