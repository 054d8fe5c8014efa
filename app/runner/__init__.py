"""Running the service: the launcher, the worker supervisor and the uvicorn write tweak."""
