"""Everything buildq keeps in Redis: key names, Lua scripts, job state, claims, slots, logs, janitor."""
