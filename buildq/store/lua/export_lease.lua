-- export_lease: one exporter per cache ref at a time across the deployment, and the newest build's
-- export wins. A build takes the ref's lease before it launches buildctl (and renews it while it
-- runs); the lease names the holder (`job`) and its build order (`order`: its enqueued_at), and
-- lapses at `until` (a holder that died). Fences: only the holder renews or releases it; a build
-- older than the holder, or than the newest build that exported (`done_order`), never exports.
-- Both steps are export_fn.lua's (the claim and a build's last write run them too).
local lease = KEYS[1]          -- export:<cache key>, a hash
local op = ARGV[1]             -- take (or renew) | release
local job_id = ARGV[2]
local order = ARGV[3]          -- the build's order: its enqueued_at (epoch s, server clock)
local ttl_ms = tonumber(ARGV[4]) -- take: how long the lease lasts unless renewed
local exported = ARGV[5]       -- release: '1' when the holder's export completed
local keep_s = tonumber(ARGV[6]) -- take: how long the key (and `done_order`) is kept from here
-- -> take: {1, ''} granted | {2, newer job} a newer build holds it or exported: skip the export
--    | {3, older job} an older build holds it: wait for it;  release: {1, ''} | {0, ''} not the holder
if op == 'release' then
  if release_export(lease, job_id, order, exported) then return {1, ''} end
  return {0, ''}
end
return take_export(lease, job_id, order, ttl_ms, keep_s)
