"""The job store's Lua scripts: every read-modify-write of the store runs as one script, so two
processes never interleave (worker/service/jobstore.py and, for the per-tenant quotas,
worker/service/quotas.py register and call them)."""

# Update a record only if its status is one of ARGV[1] (JSON list; empty = any). ARGV[2] is the
# new status ('' keeps it), ARGV[3] a JSON object of already JSON-encoded field values, ARGV[4] a
# TTL in seconds applied to KEYS[1] and KEYS[4] when the new status is terminal ('0': none),
# ARGV[5] a member removed from the set KEYS[3] then, ARGV[6] '1' to keep the job counters in
# KEYS[2]. ARGV[7] (optional) names a field that must be set (not null), else it is refused.
# KEYS[5] and KEYS[6] (optional): the tenant's active set and held list (worker/service/quotas.py),
# which a job leaves when it becomes terminal, in the same script: its quota slot frees itself.
# Returns {'ok'|'refused'|'missing', previous status}.
UPDATE_IF = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'missing', ''} end
local curs = cjson.decode(cur)
local allowed = cjson.decode(ARGV[1])
if #allowed > 0 then
  local ok = false
  for _, s in ipairs(allowed) do if s == curs then ok = true end end
  if not ok then return {'refused', curs} end
end
if ARGV[7] and ARGV[7] ~= '' then
  local v = redis.call('HGET', KEYS[1], ARGV[7])
  if (not v) or v == 'null' then return {'refused', curs} end
end
local fields = cjson.decode(ARGV[3])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
local new = ARGV[2]
if new ~= '' then
  redis.call('HSET', KEYS[1], 'status', cjson.encode(new))
  if ARGV[6] == '1' and new ~= curs then
    if curs == 'queued' or curs == 'running' then redis.call('HINCRBY', KEYS[2], curs, -1) end
    redis.call('HINCRBY', KEYS[2], new, 1)
  end
  if tonumber(ARGV[4]) > 0 then
    redis.call('EXPIRE', KEYS[1], ARGV[4])
    redis.call('EXPIRE', KEYS[4], ARGV[4])
    if ARGV[5] ~= '' then redis.call('SREM', KEYS[3], ARGV[5]) end
    if KEYS[5] and KEYS[5] ~= '' and ARGV[5] ~= '' then
      redis.call('SREM', KEYS[5], ARGV[5])
      redis.call('LREM', KEYS[6], 0, ARGV[5])
    end
  end
end
return {'ok', curs}
"""

# Delete a dataset record unless a job still uses it. KEYS: hash, its job set, tenant index, the
# tenant's stored bytes per dataset (quotas.py: the dataset's share of its quota goes with it).
# ARGV: dataset id, tenant (JSON-encoded).
DELETE_DATASET = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[2] then return 'missing' end
if redis.call('SCARD', KEYS[2]) > 0 then return 'busy' end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
return 'deleted'
"""

# Append an event; its id is its 1-based position. ARGV[1]: the event JSON without `id`.
APPEND_EVENT = """
local id = redis.call('LLEN', KEYS[1]) + 1
redis.call('RPUSH', KEYS[1], '{"id":' .. id .. ',' .. string.sub(ARGV[1], 2))
return id
"""

RENEW_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# ---- per-tenant quotas and fair dispatch (worker/service/quotas.py) ----------------------------------

# Move held jobs of one tenant to the dispatching set while fewer than `cap` of its jobs are handed
# to the workers (active jobs not held; cap <= 0: no cap), oldest first; returns their ids. Shared
# by CREATE_JOB and RELEASE, so that both count the same way.
_RELEASE_FN = """
local function release(active, held, dispatching, cap, now)
  local out = {}
  local waiting = redis.call('LLEN', held)
  local handed = redis.call('SCARD', active) - waiting
  while waiting > 0 and (cap <= 0 or handed < cap) do
    local id = redis.call('LPOP', held)
    redis.call('ZADD', dispatching, now, id)
    out[#out + 1] = id
    handed = handed + 1
    waiting = waiting - 1
  end
  return out
end
"""

# Create a job unless the idempotency key KEYS[5] already names one or the tenant is at its job
# limit; it joins the tenant's active set and held list, and whatever the tenant's cap lets go now
# (it, or older held jobs) moves to the dispatching set for the caller to send. Its first event
# says which, written here so that it comes before anything a worker writes.
# KEYS: 1 job hash, 2 tenant job index, 3 dataset hash, 4 dataset's job set, 5 idempotency key,
# 6 job counters, 7 tenant's active set, 8 tenant's held list, 9 dispatching zset, 10 job events.
# ARGV: 1 job id, 2 encoded fields (JSON object), 3 idempotency value ('' = no key), 4 its TTL,
# 5 tenant (JSON-encoded), 6 most active jobs of the tenant (0: no limit), 7 most handed to the
# workers at once (0: no cap), 8 now (ms), 9 first event (JSON without id) if handed on at once,
# 10 if held ('' = no event). Returns {'existing', value}, {'no_dataset', ''},
# {'dataset_not_ready', status}, {'over_limit', active jobs} or {'created', '1' held | '0', ids to send...}.
CREATE_JOB = _RELEASE_FN + """
if ARGV[3] ~= '' then
  local existing = redis.call('GET', KEYS[5])
  if existing then return {'existing', existing} end
end
local st = redis.call('HGET', KEYS[3], 'status')
if (not st) or redis.call('HGET', KEYS[3], 'tenant') ~= ARGV[5] then return {'no_dataset', ''} end
if st ~= '"ready"' then return {'dataset_not_ready', cjson.decode(st)} end
local active = redis.call('SCARD', KEYS[7])
if tonumber(ARGV[6]) > 0 and active >= tonumber(ARGV[6]) then return {'over_limit', active} end
local fields = cjson.decode(ARGV[2])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('HINCRBY', KEYS[6], 'queued', 1)
if ARGV[3] ~= '' then redis.call('SET', KEYS[5], ARGV[3], 'EX', ARGV[4]) end
redis.call('SADD', KEYS[7], ARGV[1])
redis.call('RPUSH', KEYS[8], ARGV[1])
local send = release(KEYS[7], KEYS[8], KEYS[9], tonumber(ARGV[7]), tonumber(ARGV[8]))
local held = '1'
for _, id in ipairs(send) do if id == ARGV[1] then held = '0' end end
local event = held == '1' and ARGV[10] or ARGV[9]
if event ~= '' then
  local id = redis.call('LLEN', KEYS[10]) + 1
  redis.call('RPUSH', KEYS[10], '{"id":' .. id .. ',' .. string.sub(event, 2))
end
local out = {'created', held}
for _, id in ipairs(send) do out[#out + 1] = id end
return out
"""

# Release what a tenant's cap lets go now. KEYS: active set, held list, dispatching zset.
# ARGV: cap, now (ms). Returns the ids to send.
RELEASE = _RELEASE_FN + """
return release(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]), tonumber(ARGV[2]))
"""

# Members of the dispatching zset older than ARGV[1] (ms): taken out of a held list (or created)
# by a process that has not confirmed the send since, so it most likely died. Each is stamped
# ARGV[2] (now) before it is returned, so that one reaper sends it, not every worker at once.
# ARGV[3]: the most to return.
CLAIM_STALE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""

# Create a dataset record within the tenant's dataset count and stored bytes. KEYS: dataset hash,
# tenant dataset index, tenant's stored bytes per dataset (hash), the records whose validation task
# is not sent yet (zset, worker/service/uploads.py). ARGV: dataset id, encoded fields, its bytes, most
# datasets (0: no limit), most bytes (0: no limit), now in ms ('' = not waiting for a validation task).
# Returns {'created', 0}, {'datasets', count} or {'bytes', stored bytes}.
CREATE_DATASET = """
local count = redis.call('HLEN', KEYS[3])
if tonumber(ARGV[4]) > 0 and count >= tonumber(ARGV[4]) then return {'datasets', count} end
local stored = 0
for _, v in ipairs(redis.call('HVALS', KEYS[3])) do stored = stored + tonumber(v) end
if tonumber(ARGV[5]) > 0 and stored + tonumber(ARGV[3]) > tonumber(ARGV[5]) then
  return {'bytes', stored}
end
local fields = cjson.decode(ARGV[2])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
if ARGV[6] and ARGV[6] ~= '' then redis.call('ZADD', KEYS[4], ARGV[6], ARGV[1]) end
return {'created', 0}
"""

# Mark a dataset record an API left behind `invalid` (worker/service/uploads.py), if it still is one:
# in the unsent set since before ARGV[2] (ms), still `validating`, and no validation running (no
# deliveries count). Its quota share goes, and the record expires after ARGV[4] seconds.
# KEYS: dataset hash, unsent zset, the validation's deliveries key, the tenant's stored bytes (hash).
# ARGV: dataset id, cutoff (ms), encoded fields (JSON object), TTL.
# Returns 'sent' (not in the set), 'fresh', 'settled' (gone or validated: left the set), 'running' or 'abandoned'.
ABANDON_UPLOAD = """
local since = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not since then return 'sent' end
if tonumber(since) > tonumber(ARGV[2]) then return 'fresh' end
if redis.call('HGET', KEYS[1], 'status') ~= '"validating"' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 'settled'
end
if redis.call('EXISTS', KEYS[3]) == 1 then return 'running' end
for k, v in pairs(cjson.decode(ARGV[3])) do redis.call('HSET', KEYS[1], k, v) end
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
return 'abandoned'
"""
