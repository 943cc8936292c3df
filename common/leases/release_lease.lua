-- Drop a lease and its running entry, only while the token is ours: a delivery that took the job
-- over keeps its own. KEYS: the lease, the running hash; ARGV: the token, the task id.
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('del', KEYS[1])
  redis.call('hdel', KEYS[2], ARGV[2])
end
