-- result (part): the one block that ends a job, shared by finish and reject. The record is stored,
-- the job hash says the final state (its attempt history and janitor copy go: the record holds the
-- history now), the job leaves the queued index, and waiters on its "done" channel are told.
local function store_result(result_key, job_hash, queued_index, done_channel, job_id, record, state, ttl)
  redis.call('SET', result_key, record, 'EX', ttl)
  redis.call('HSET', job_hash, 'state', state, 'phase', 'done')
  redis.call('HDEL', job_hash, 'msg', 'tag', 'attempts', 'running', 'avoid', 'waiting_since', 'window_start')
  redis.call('EXPIRE', job_hash, ttl)
  redis.call('ZREM', queued_index, job_id)
  redis.call('PUBLISH', done_channel, state)
end

-- still_holds(job_hash, result_key, lease_key, token, gen): whether the holder of claim `gen` (whose lease
-- token is `token`) may still act for the job: no result yet, the claim generation is still `gen`
-- (nobody claimed the job since), and the lease is `token`'s or has expired.
local function still_holds(job_hash, result_key, lease_key, token, gen)
  if redis.call('EXISTS', result_key) == 1 then return false end
  if redis.call('HGET', job_hash, 'gen') ~= gen then return false end
  local holder = redis.call('GET', lease_key)
  return (not holder) or holder == token
end
