-- export_lease: one exporter per cache ref at a time across the deployment, and the newest build's
-- export wins. A build takes the ref's lease before it launches buildctl (and renews it while it
-- runs); the lease names the holder (`job`) and its build order (`order`: its enqueued_at), and
-- lapses at `until` (a holder that died). Fences: only the holder renews or releases it; a build
-- older than the holder, or than the newest build that exported (`done_order`), never exports.
local lease = KEYS[1]          -- export:<cache key>, a hash
local op = ARGV[1]             -- take (or renew) | release
local job_id = ARGV[2]
local order = ARGV[3]          -- the build's order: its enqueued_at (epoch s, server clock)
local ttl_ms = tonumber(ARGV[4]) -- take: how long the lease lasts unless renewed
local exported = ARGV[5]       -- release: '1' when the holder's export completed
local keep_s = tonumber(ARGV[6]) -- how long the key (and `done_order`) is kept after a write
-- -> take: {1, ''} granted | {2, newer job} a newer build holds it or exported: skip the export
--    | {3, older job} an older build holds it: wait for it;  release: {1, ''} | {0, ''} not the holder
if op == 'release' then
  if release_export(lease, job_id, order, exported, keep_s) then return {1, ''} end
  return {0, ''}
end
local h = read(lease, {'job', 'order', 'until', 'done_order', 'done_job'})
if h.job == job_id then  -- the holder renews (or a take whose reply was lost)
  redis.call('HSET', lease, 'until', now + ttl_ms)
  redis.call('EXPIRE', lease, keep_s)
  return {1, ''}
end
if h.done_order and newer(h.done_order, h.done_job or '', order, job_id) then return {2, h.done_job or ''} end
if h.job and tonumber(h['until'] or '0') > now then
  if newer(h.order, h.job, order, job_id) then return {2, h.job} end
  return {3, h.job}
end
redis.call('HSET', lease, 'job', job_id, 'order', order, 'until', now + ttl_ms)
redis.call('EXPIRE', lease, keep_s)
return {1, ''}
