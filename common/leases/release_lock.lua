-- Drop a key lock, only while the token is ours. KEYS: the lock; ARGV: the token.
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
