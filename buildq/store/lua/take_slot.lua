-- take_slot: a daemon slot for the holder of claim `gen`, whose claim found every daemon full
-- (polled): the least loaded daemon with room, or with `only` set that daemon alone (the remembered
-- one the claim waits for). Taken as the claim takes one: the slot on the job, the job running.
local job_hash = KEYS[1]
local load_index = KEYS[2]
local gen = ARGV[1]
local limit = tonumber(ARGV[2])
local avoid = ARGV[3]          -- a daemon taken only when no other has room ('' for none)
local only = ARGV[4]           -- '' for any daemon
local attempt = ARGV[5]
local worker = ARGV[6]
-- -> {1, daemon} granted ('' none has room) | {0} the claim is no longer ours | {4} the load index
--    is gone (the caller registers it and tries again)
local h = read(job_hash, {'gen', 'done_gen', 'slot', 'running'})
if h.done_gen or h.gen ~= gen then return {0} end
if h.slot and h.slot ~= '' then return {1, h.slot} end  -- this very call ran before (a lost reply)
local daemon = ''
if only ~= '' then
  local load = redis.call('ZSCORE', load_index, only)
  if load and tonumber(load) < limit then daemon = only end
else
  daemon = least_loaded(load_index, limit, avoid)
end
if daemon == '' then
  if redis.call('EXISTS', load_index) == 0 then return {4} end
  return {1, ''}
end
local set = extend(take(load_index, daemon), {'state', 'running', 'phase', 'launch', 'attempt', attempt,
  'worker', worker, 'daemon', daemon, 'started_at', string.format('%.3f', now / 1000)})
if h.running then
  local run = cjson.decode(h.running)
  run['daemon'] = daemon
  extend(set, {'running', cjson.encode(run)})
end
redis.call('HSET', job_hash, unpack(set))
return {1, daemon}
