-- supersede (part): the newest job of a supersede key cancels the older ones while they are queued
-- or running (never one that has its record). `supersede:<key>` names the newest job submitted (or,
-- for a producer's own message, first claimed) with the key; each newer job cancels the one it
-- names, so every older one was cancelled by the job after it.

-- supersede(pointer, job_prefix, job_id, job_hash, order, cancels, ttl): `job_id` (its hash
-- `job_hash`, ordered by `order`, its enqueued_at) takes the key `pointer` -> {the job it
-- superseded ('' none), the newer job that supersedes it ('' none)}
local function supersede(pointer, job_prefix, job_id, job_hash, order, cancels, ttl)
  local newest = redis.call('GET', pointer)
  if newest == job_id then return {'', ''} end
  -- cancel(hash, id, by, mine): a job (this one when `mine`: its hash may not exist yet, a
  -- producer's own message) is cancelled, unless it finished (never touched) or is gone
  local cancel = function(hash, id, by, mine)
    local h = redis.call('HMGET', hash, 'record', 'enqueued_at')
    if h[1] or not (h[2] or mine) then return false end
    redis.call('HSET', hash, 'cancel', 'superseded', 'superseded_by', by)
    redis.call('PUBLISH', cancels, id)
    return true
  end
  if newest then
    local other = job_prefix .. newest
    local theirs = tonumber(redis.call('HGET', other, 'enqueued_at') or '')
    if theirs and (theirs > order or (theirs == order and newest > job_id)) then
      -- a newer job holds the key already (this one reached a worker late): this one is superseded
      cancel(job_hash, job_id, newest, true)
      return {'', newest}
    end
    redis.call('SET', pointer, job_id, 'EX', ttl)
    if cancel(other, newest, job_id, false) then return {newest, ''} end
    return {'', ''}
  end
  redis.call('SET', pointer, job_id, 'EX', ttl)
  return {'', ''}
end
