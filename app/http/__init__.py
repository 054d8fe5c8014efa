"""The HTTP front door: the app factory, the lean predict path, routes, auth and schemas."""
