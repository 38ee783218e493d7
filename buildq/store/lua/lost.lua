-- lost: which of these queued jobs' messages the broker lost (a Redis restart between kombu's
-- BRPOP and its unacked record, or writes a restart did not keep). A job's current message is lost
-- when the job is still queued (no record, no live lease), its delivery tag is not among kombu's
-- delivered-and-unacknowledged messages, and it is not in its queue either. That last part is known
-- without searching the queue: every push keeps `pushed_at` (server ms, in the job hash) from
-- decreasing from a queue's head (the next message out) to its tail — new messages go to the tail
-- stamped now, messages put back go to the head keeping their older stamp — so a message pushed
-- before the one at the head (by more than `margin_ms`: the moment between a release and kombu's
-- push) has left the queue. O(1) per job. A job whose hash is gone leaves the active index.
local unacked = KEYS[1]        -- kombu's hash of delivered, unacknowledged messages
local active_index = KEYS[2]
local job_hashes = {unpack(KEYS, 3)}  -- one per job id, in the same order
local margin_ms = tonumber(ARGV[1])
local job_prefix = ARGV[2]     -- a job hash's name without its job id
local job_ids = {unpack(ARGV, 3)}
-- -> {job id, pushed_at} pairs, flattened, of the jobs whose message is lost
local heads = {}
-- the head message's stamp: math.huge for an empty queue (everything pushed has left it),
-- -math.huge when unknown (not a message buildq stamped: nothing is known lost behind it). The
-- head's job hash is read by name (the one key not in KEYS).
local function head_stamp(queue)
  if heads[queue] == nil then
    local stamp = -math.huge
    local top = redis.call('LINDEX', queue, -1)
    if not top then
      stamp = math.huge
    else
      local ok, message = pcall(cjson.decode, top)
      local headers = ok and type(message) == 'table' and message['headers']
      local props = ok and type(message) == 'table' and message['properties']
      local id = type(headers) == 'table' and headers['id']
      local tag = type(props) == 'table' and props['delivery_tag']
      if type(id) == 'string' and type(tag) == 'string' then
        local hv = redis.call('HMGET', job_prefix .. id, 'tag', 'pushed_at')
        if hv[1] == tag and hv[2] then stamp = tonumber(hv[2]) end
      end
    end
    heads[queue] = stamp
  end
  return heads[queue]
end
local out = {}
for i, job_hash in ipairs(job_hashes) do
  local h = redis.call('HMGET', job_hash, 'record', 'lease', 'lease_until', 'queue', 'tag', 'pushed_at')
  if not h[4] or h[1] then
    redis.call('ZREM', active_index, job_ids[i])
  elseif not (h[2] and tonumber(h[3] or '0') > now) and h[6]
      and (not h[5] or redis.call('HEXISTS', unacked, h[5]) == 0)
      and tonumber(h[6]) + margin_ms < head_stamp(h[4]) then
    out[#out + 1] = job_ids[i]
    out[#out + 1] = h[6]
  end
end
return out
