-- KEYS down-daemons hash, slot sets in preference order; ARGV token, ttl_ms, limit, prefix length,
-- daemon to avoid ('' for none) -> 1-based index granted | 0 every daemon that is up is full
return acquire_any(2, ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5])
