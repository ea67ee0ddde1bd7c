-- How the scripts read their sections of ARGV: each a count, then its items. `i` is where the
-- next one starts (each script sets it past its fixed arguments); section() returns the first and
-- last index of its items.
local i
local function section()
  local n = tonumber(ARGV[i])
  i = i + 1 + n
  return i - n, i - 1
end
