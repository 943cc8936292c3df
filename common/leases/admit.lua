-- A job's admission, in one step: a paused batch's job is set aside (only while the batch is still
-- paused: resume.lua takes the flag and every set-aside job in one step, so none is set aside after
-- its batch resumed), a cancelled batch's or job's is refused.
-- KEYS: the job's cancel flag, then, for a job of a batch, the batch's pause flag, set-aside list
-- and cancel flag. ARGV: the job as a SetAside record. Returns an Admission.
if #KEYS == 4 then
  if redis.call('exists', KEYS[2]) == 1 then redis.call('rpush', KEYS[3], ARGV[1]) return 1 end
  if redis.call('exists', KEYS[4]) == 1 then return 2 end
end
if redis.call('exists', KEYS[1]) == 1 then return 3 end
return 0
