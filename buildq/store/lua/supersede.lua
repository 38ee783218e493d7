-- supersede: a worker makes a job with a supersede key the newest of its key before it claims it
-- (a producer's own message never ran submit.lua, which does this at submit; for a submitted job
-- this finds itself named and does nothing). An older job named there is cancelled (supersede_fn);
-- a newer one cancels this one. A job not submitted is ordered by the time its id says it was made
-- (an id of buildq's making), else by the server clock now (when a worker first saw it).
local pointer = KEYS[1]        -- supersede:<key>
local job_hash = KEYS[2]
local job_id = ARGV[1]
local job_prefix = ARGV[2]     -- a job hash's name without its job id
local cancels = ARGV[3]        -- the channel every pool process listens to
local ttl = tonumber(ARGV[4])
local order_hint = ARGV[5]     -- epoch s when the job id says when it was made ('' when it does not)
-- -> {the job superseded ('' none), the newer job superseding this one ('' none)}
local order = tonumber(redis.call('HGET', job_hash, 'enqueued_at') or '') or tonumber(order_hint)
  or tonumber(t[1]) + tonumber(t[2]) / 1000000
return supersede(pointer, job_prefix, job_id, job_hash, order, cancels, ttl)
