-- Move keys of a release before the shards to their sharded names (see `upgrade`), on
-- one Redis (never a cluster: no such release ran on one). Atomic per call.
-- KEYS: pairs of (old name, new name)
-- Returns {moved, conflicts}: a pair whose new name exists already is left as it is
-- and counted (nothing else can write the new names before the move: every process of
-- this release moves first, and older ones must be stopped; see docs/operations.md, "Upgrades").
local moved, conflicts = 0, 0
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('RENAMENX', KEYS[i], KEYS[i + 1]) == 1 then
      moved = moved + 1
    else
      conflicts = conflicts + 1
    end
  end
end
return {moved, conflicts}
