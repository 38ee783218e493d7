-- job (part): a job hash read by field names, and the daemon slot its claim holds given back.

-- read(job_hash, names): the fields `names` of the job hash as a table (absent ones nil), one HMGET
local function read(job_hash, names)
  local values = redis.call('HMGET', job_hash, unpack(names))
  local out = {}
  for i, name in ipairs(names) do
    if values[i] then out[name] = values[i] end
  end
  return out
end

-- extend(list, more): `more` appended to `list` (field, value pairs for one HSET)
local function extend(list, more)
  for _, v in ipairs(more) do list[#list + 1] = v end
  return list
end

-- give_back(h): the daemon slot the claim in `h` holds (its `slot` and `slot_load` fields) is free
-- again -> the field changes that say so ({} when it holds none). `slot_load` is the one key not
-- passed in KEYS: the load index that claim counted its slot in, written by the claim itself.
local function give_back(h)
  if h.slot and h.slot ~= '' and h.slot_load and h.slot_load ~= '' then
    redis.call('ZINCRBY', h.slot_load, -1, h.slot)
    return {'slot', ''}
  end
  return {}
end
