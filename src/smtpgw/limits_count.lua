-- smtpgw's sending-limit counter, one script run in Redis (EVALSHA) by both its users: the policy
-- service's look at the first RCPT (commit 0: does the message fit?) and rspamd's count at the
-- end of DATA (commit 1: count it if it fits). The relay role installs this file beside
-- policyd.py and puts its text into rspamd's Lua rule, so both run the same script.
--
-- KEYS: the counters of one message (sorted sets of accepted messages' times, Redis's clock).
-- ARGV: member, commit (1: count the message if it fits), then per key: the day's limit, the
-- hour's limit (0: none).
-- Returns {0, messages left} when it fits (and was counted if commit; left is the least, over
-- every counter and window, after this message), else {key index, "day"|"hour", limit,
-- milliseconds until a slot frees}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member = ARGV[1]
local commit = ARGV[2] == '1'
local used = commit and 1 or 0
local left = nil
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - 86400000)
  local day = tonumber(ARGV[1 + 2 * i])
  local hour = tonumber(ARGV[2 + 2 * i])
  if day > 0 then
    local n = redis.call('ZCARD', key)
    if n >= day then
      local s = redis.call('ZRANGE', key, n - day, n - day, 'WITHSCORES')
      return {i, 'day', day, tonumber(s[2]) + 86400000 - now}
    end
    left = math.min(left or day, day - n - used)
  end
  if hour > 0 then
    local n = redis.call('ZCOUNT', key, now - 3600000, '+inf')
    if n >= hour then
      local s = redis.call('ZRANGEBYSCORE', key, now - 3600000, '+inf', 'WITHSCORES',
                           'LIMIT', n - hour, 1)
      return {i, 'hour', hour, tonumber(s[2]) + 3600000 - now}
    end
    left = math.min(left or hour, hour - n - used)
  end
end
if commit then
  for _, key in ipairs(KEYS) do
    redis.call('ZADD', key, now, member)
    redis.call('PEXPIRE', key, 86400000)
  end
end
return {0, left or 0}
