"""The HTTP front door: the app factory, the lean inference path, routes, auth and schemas."""

PROBE_PATHS = ("/health/", "/v2/health/", "/metrics")
"""Probes and scrapes: neither observed (logs, request metrics) nor refused while draining."""
VERSION_HEADER = "X-Model-Version"
"""The answer header naming the version that served a request."""
