-- Whether the delivery's token still holds each name (before a write). KEYS: the names; ARGV: the
-- token. Returns the index of the first name lost, or 0.
for i, name in ipairs(KEYS) do
  if redis.call('get', name) ~= ARGV[1] then return i end
end
return 0
