-- wrk script: POST the body in $BODY_FILE with $CONTENT_TYPE, and optional headers: $TENSOR_SHAPE
-- and $TENSOR_DTYPE for raw tensor bodies, $ACCEPT, $HEADER_LENGTH for the Open Inference
-- Protocol's binary bodies, $TOKEN for the API token. Prints one JSON summary line at the end.
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE") or "application/json"
if os.getenv("TENSOR_SHAPE") then
  wrk.headers["X-Tensor-Shape"] = os.getenv("TENSOR_SHAPE")
  wrk.headers["X-Tensor-Dtype"] = os.getenv("TENSOR_DTYPE")
end
if os.getenv("TOKEN") then
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("TOKEN")
end
if os.getenv("ACCEPT") then
  wrk.headers["Accept"] = os.getenv("ACCEPT")
end
if os.getenv("HEADER_LENGTH") then
  wrk.headers["Inference-Header-Content-Length"] = os.getenv("HEADER_LENGTH")
end
local file = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.body = file:read("*a")
file:close()

done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    errors.connect, errors.read, errors.write, errors.status, errors.timeout))
end
