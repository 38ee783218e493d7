-- export (part): giving back a cache ref's export lease. export_lease.lua's release runs it, and so
-- do finish.lua and requeue.lua, so a build's last write after buildctl exits gives the lease back in
-- the same round trip. Needs job_fn's read().

-- newer(their_order, their_job, order, job_id): is the build (their_order, their_job) newer than
-- (order, job_id)? Build order: enqueued_at, then the job id (a tie is broken the same everywhere)
local function newer(their_order, their_job, order, job_id)
  local theirs, ours = tonumber(their_order), tonumber(order)
  return theirs > ours or (theirs == ours and their_job > job_id)
end

-- release_export(lease, job_id, order, exported, keep_s): give back the lease when `job_id` holds it
-- (fence: only the holder); `exported` '1' when its export completed: then it becomes the ref's
-- `done_order` (so no older build exports after it) unless a newer build's is there already.
-- The key is kept `keep_s`. -> true when `job_id` held it
local function release_export(lease, job_id, order, exported, keep_s)
  local h = read(lease, {'job', 'done_order', 'done_job'})
  if h.job ~= job_id then return false end
  redis.call('HDEL', lease, 'job', 'order', 'until')
  if exported == '1' and not (h.done_order and newer(h.done_order, h.done_job or '', order, job_id)) then
    redis.call('HSET', lease, 'done_order', order, 'done_job', job_id)
  end
  redis.call('EXPIRE', lease, keep_s)
  return true
end

