"""The Lua scripts the shared state server runs, each one atomic step for the whole fleet.

Every entry is dated by the server's clock (``TIME``), so the hosts' clocks may differ.
A ledger is a sorted set of requests by when they were sent; a member ends in ``#n`` when
it stands for n units (tokens), else for one. A counting ledger costs O(log n) a request;
the tokens ledger is summed, O(n) in the requests of its minute.
"""

from __future__ import annotations

# Takes the claim to try an unproven key first; returns 0 when taken (or held by this host),
# else the milliseconds another host still holds it.
CLAIM = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 0
end
if holder == ARGV[1] then return 0 end
return math.max(1, redis.call('PTTL', KEYS[1]))
"""

# Admits one request on a key against every fleet-wide limit that applies, all or none.
# KEYS: the provider window's ledger, the rpm ledger, the tpm ledger, the leases.
# ARGV: member, window limit, window ms, rpm, tpm, tokens, max_concurrent, lease ms,
# rpm/tpm window ms (a limit of 0 does not apply). Returns {0, 0} when admitted (the
# request is in every ledger, and holds a lease when max_concurrent applies), else
# {ms until the ledgers have room (0: they have), 1 when every lease is taken}.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function units(member)
  return tonumber(string.match(member, '#(%d+)$')) or 1
end
local function wait_for_count(key, limit, window)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if limit <= 0 then return 0 end
  local over = redis.call('ZCARD', key) + 1 - limit
  if over <= 0 then return 0 end
  local oldest = redis.call('ZRANGE', key, over - 1, over - 1, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window - now)
end
local function wait_for(key, limit, window, amount)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if limit <= 0 then return 0 end
  local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  local total = 0
  for i = 1, #entries, 2 do total = total + units(entries[i]) end
  local need = total + amount - limit
  if need <= 0 then return 0 end
  for i = 1, #entries, 2 do
    need = need - units(entries[i])
    if need <= 0 then return math.max(1, tonumber(entries[i + 1]) + window - now) end
  end
  return window
end
local member, window_ms, minute = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[9])
local rpm, tpm, tokens = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local max_concurrent, lease_ms = tonumber(ARGV[7]), tonumber(ARGV[8])
local wait = wait_for_count(KEYS[1], tonumber(ARGV[2]), window_ms)
if rpm > 0 then wait = math.max(wait, wait_for_count(KEYS[2], rpm, minute)) end
if tpm > 0 then wait = math.max(wait, wait_for(KEYS[3], tpm, minute, tokens)) end
local leases_full = 0
if max_concurrent > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if redis.call('ZCARD', KEYS[4]) >= max_concurrent then leases_full = 1 end
end
if wait > 0 or leases_full == 1 then return {wait, leases_full} end
redis.call('ZADD', KEYS[1], now, member)
redis.call('PEXPIRE', KEYS[1], window_ms)
if rpm > 0 then
  redis.call('ZADD', KEYS[2], now, member)
  redis.call('PEXPIRE', KEYS[2], minute)
end
if tpm > 0 then
  redis.call('ZADD', KEYS[3], now, member .. '#' .. tokens)
  redis.call('PEXPIRE', KEYS[3], minute)
end
if max_concurrent > 0 then
  redis.call('ZADD', KEYS[4], now + lease_ms, member)
  redis.call('PEXPIRE', KEYS[4], lease_ms)
end
return {0, 0}
"""

# Adds ARGV[2] requests (named ARGV[3]..n) to a window ledger of ARGV[1] ms.
RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
for i = 1, tonumber(ARGV[2]) do
  redis.call('ZADD', KEYS[1], now, ARGV[2 + i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 0
"""
