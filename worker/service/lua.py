"""The job store's Lua scripts: every read-modify-write of the store runs as one script, so two
processes never interleave (worker/service/jobstore.py registers and calls them)."""

# Update a record only if its status is one of ARGV[1] (JSON list; empty = any). ARGV[2] is the
# new status ('' keeps it), ARGV[3] a JSON object of already JSON-encoded field values, ARGV[4] a
# TTL in seconds applied to KEYS[1] and KEYS[4] when the new status is terminal ('0': none),
# ARGV[5] a member removed from the set KEYS[3] then, ARGV[6] '1' to keep the job counters in
# KEYS[2]. ARGV[7] (optional) names a field that must be set (not null), else it is refused.
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
  end
end
return {'ok', curs}
"""

# Create a job unless the idempotency key KEYS[5] already names one. KEYS: job hash, tenant job
# index, dataset hash, dataset's job set, idempotency key, job counters. ARGV: job id, encoded
# fields (JSON object), idempotency value ('' = no key), its TTL, tenant (JSON-encoded).
CREATE_JOB = """
if ARGV[3] ~= '' then
  local existing = redis.call('GET', KEYS[5])
  if existing then return {'existing', existing} end
end
local st = redis.call('HGET', KEYS[3], 'status')
if (not st) or redis.call('HGET', KEYS[3], 'tenant') ~= ARGV[5] then return {'no_dataset', ''} end
if st ~= '"ready"' then return {'dataset_not_ready', cjson.decode(st)} end
local fields = cjson.decode(ARGV[2])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('HINCRBY', KEYS[6], 'queued', 1)
if ARGV[3] ~= '' then redis.call('SET', KEYS[5], ARGV[3], 'EX', ARGV[4]) end
return {'created', ARGV[1]}
"""

# Delete a dataset record unless a job still uses it. KEYS: hash, its job set, tenant index.
# ARGV: dataset id, tenant (JSON-encoded).
DELETE_DATASET = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[2] then return 'missing' end
if redis.call('SCARD', KEYS[2]) > 0 then return 'busy' end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
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
