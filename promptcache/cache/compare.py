"""The one compare-and-delete script: delete a key only while it still holds what we put there.

Used for a flight lock (the value is the holder's token) and an exact-tier key (the value is an
entry record: compared on its `entry_id`, since a refresh may have replaced the entry).
"""

from __future__ import annotations

# KEYS[1] = the key; ARGV[1] = the value expected; ARGV[2] (optional) = the field of the JSON
# value to compare instead of the whole value
COMPARE_AND_DELETE = """
local value = redis.call('GET', KEYS[1])
if not value then return 0 end
if ARGV[2] and ARGV[2] ~= '' then
  local ok, decoded = pcall(cjson.decode, value)
  if not ok or type(decoded) ~= 'table' then return 0 end
  value = decoded[ARGV[2]]
end
if value == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
