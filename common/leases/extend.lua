-- A lease's heartbeat, in one step: extend every name the delivery's token holds (its lease, its
-- key lock), but only while Redis still holds that token there, then read the job's cancel flags.
-- KEYS: the ARGV[3] names the token holds, then the cancel flags (the batch's, the job's).
-- ARGV: the token, the lease in ms, how many KEYS the token holds.
-- Returns the index of a name lost, or minus the index of a flag set, or 0.
local held = tonumber(ARGV[3])
for i = 1, held do
  if redis.call('get', KEYS[i]) ~= ARGV[1] then return i end
end
for i = 1, held do redis.call('pexpire', KEYS[i], ARGV[2]) end
for i = held + 1, #KEYS do
  if redis.call('exists', KEYS[i]) == 1 then return held - i end
end
return 0
