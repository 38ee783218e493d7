-- take_slot: a slot on the least loaded daemon that is up and has room (see slots_fn.lua), for a
-- claim that found every daemon full and polls.
local down_hash = KEYS[1]
local slot_sets = {unpack(KEYS, 2)}  -- one per daemon, in the caller's preference order
local token = ARGV[1]
local ttl_ms = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local prefix_len = tonumber(ARGV[4])
local avoid = ARGV[5]          -- a daemon taken only when no other has room ('' for none)
-- -> the 1-based position of the daemon granted | 0 every daemon that is up is full
return take_any(slot_sets, down_hash, token, ttl_ms, limit, prefix_len, avoid)
