-- POST one fixed body, read from a file, on every request (used by bench/serve.py).
--
--   wrk -t1 -c1 -d10s --latency -s bench/wrk/post.lua URL -- BODY_FILE ["Name: value" ...]
--
-- The body is read once per wrk thread in init(); wrk formats the request once
-- after init() returns and sends those same bytes every time, so no Lua runs per
-- request (no request() or response() function: wrk skips parsing bodies then).

function init(args)
  local path = args[1]
  if path == nil then
    error("post.lua: expected the body file as the first argument after --, got none")
  end
  local file = assert(io.open(path, "rb"))
  wrk.body = file:read("*a")
  file:close()
  wrk.method = "POST"
  for i = 2, #args do
    local name, value = args[i]:match("^([^:]+):%s*(.*)$")
    if name == nil then
      error("post.lua: expected a header 'Name: value', got '" .. args[i] .. "'")
    end
    wrk.headers[name] = value
  end
end
