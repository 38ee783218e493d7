-- lease: a named lease for `owner` (one janitor per deployment): taken when free, renewed while it
-- is `owner`'s; never taken from another owner before it expires.
local lease_key = KEYS[1]
local owner = ARGV[1]
local ttl_ms = tonumber(ARGV[2])
-- -> 1 held by `owner` now | 0 another's
local holder = redis.call('GET', lease_key)
if holder and holder ~= owner then return 0 end
redis.call('SET', lease_key, owner, 'PX', ttl_ms)
return 1
