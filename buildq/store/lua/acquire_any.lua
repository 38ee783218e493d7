-- KEYS slot sets in preference order; ARGV token, ttl_ms, limit -> 1-based index granted | 0 all full
return acquire_any(1, ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]))
