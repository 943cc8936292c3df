-- Lift a batch's pause and take every job set aside meanwhile, in one step.
-- KEYS: the pause flag, the set-aside list. Returns the set-aside records.
redis.call('del', KEYS[1])
local jobs = redis.call('lrange', KEYS[2], 0, -1)
redis.call('del', KEYS[2])
return jobs
