-- export (part): taking and giving back a cache ref's export lease. export_lease.lua runs both; the
-- claim (claim.lua) takes it for a build that starts at once, and a build's last write (finish.lua,
-- requeue.lua) gives it back, so neither needs a round trip of its own. Needs the prelude's `now`
-- (for a take) and job_fn's read().

-- newer(their_order, their_job, order, job_id): is the build (their_order, their_job) newer than
-- (order, job_id)? Build order: enqueued_at, then the job id (a tie is broken the same everywhere)
local function newer(their_order, their_job, order, job_id)
  local theirs, ours = tonumber(their_order), tonumber(order)
  return theirs > ours or (theirs == ours and their_job > job_id)
end

-- take_export(lease, job_id, order, ttl_ms, keep_s): take (or, held already, renew) the lease for
-- `job_id`, built in `order` (its enqueued_at), until `ttl_ms` from now; the key is kept `keep_s`
-- from here (a release does not touch the TTL: what it keeps was written by a take before).
-- Fences: a build older than the live holder, or than the newest build that exported
-- (`done_order`), never takes it; a holder whose lease lapsed or was given back takes it again as
-- any build would. -> {1, ''} granted | {2, newer job} a newer build holds it or exported: skip the
-- export | {3, older job} an older build holds it: wait for it
local function take_export(lease, job_id, order, ttl_ms, keep_s)
  local h = read(lease, {'job', 'order', 'until', 'done_order', 'done_job'})
  local live = tonumber(h['until'] or '0') > now
  if h.job == job_id and live then  -- the holder renews (or a take whose reply was lost)
    redis.call('HSET', lease, 'until', now + ttl_ms)
    redis.call('EXPIRE', lease, keep_s)
    return {1, ''}
  end
  if h.done_order and newer(h.done_order, h.done_job or '', order, job_id) then return {2, h.done_job or ''} end
  if h.job and live then
    if newer(h.order, h.job, order, job_id) then return {2, h.job} end
    return {3, h.job}
  end
  redis.call('HSET', lease, 'job', job_id, 'order', order, 'until', now + ttl_ms)
  redis.call('EXPIRE', lease, keep_s)
  return {1, ''}
end

-- release_export(lease, job_id, order, exported): give back the lease when `job_id` holds it
-- (fence: only the holder, once); `exported` '1' when its export completed: then it becomes the
-- ref's `done_order` (so no older build exports after it) unless a newer build's is there already.
-- Given back is `until` 0: `job` and `order` stay, naming the last holder. One write, no TTL of
-- its own (the take's stands). -> true when `job_id` held it
local function release_export(lease, job_id, order, exported)
  local h = read(lease, {'job', 'until', 'done_order', 'done_job'})
  if h.job ~= job_id or tonumber(h['until'] or '0') <= 0 then return false end
  local set = {'until', 0}
  if exported == '1' and not (h.done_order and newer(h.done_order, h.done_job or '', order, job_id)) then
    set = {'until', 0, 'done_order', order, 'done_job', job_id}
  end
  redis.call('HSET', lease, unpack(set))
  return true
end
