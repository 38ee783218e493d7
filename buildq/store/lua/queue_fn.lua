-- queue (part): where a message stands in its queue, known without searching the queue.
-- Every push keeps `pushed_at` (server ms, in the message's job hash) from decreasing from a
-- queue's head (the next message out, at the list's right end) to its tail: a new message goes to
-- the tail stamped now; one put back at the head is stamped below the head it goes in front of.
-- So a message stamped before the head's stamp is not in the queue. The head's job hash is read by
-- name (`job_prefix` .. its id: the one key a script using this part does not get in KEYS).

local heads = {}

-- head_stamp(queue, job_prefix): the stamp of the queue's head message; math.huge for an empty
-- queue (everything pushed has left it), -math.huge when unknown (not a message buildq stamped)
local function head_stamp(queue, job_prefix)
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

-- put_back(queue, job_prefix, job_hash, message, own): push `message` (of the job `job_hash`, whose
-- stamp is `own`, nil when it has none) to the queue's head, stamped below the head it goes in
-- front of
local function put_back(queue, job_prefix, job_hash, message, own)
  local stamp = own
  local head = head_stamp(queue, job_prefix)
  if own and head > -math.huge and head < math.huge and head <= own then stamp = head - 1 end
  redis.call('RPUSH', queue, message)
  if stamp then redis.call('HSET', job_hash, 'pushed_at', stamp) end
  heads[queue] = stamp or -math.huge
end
