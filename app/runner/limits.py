"""How many connections a process may hold, from its file-descriptor limit."""

from __future__ import annotations

import resource

GRPC_SHARE = 4
"""The gRPC door holds at most a quarter of the connections the HTTP door may: its clients send
their calls side by side on one connection."""


def connection_cap(wanted: int) -> int:
    """``wanted``, at most half this process's file-descriptor limit (files, the database, the
    store and the gRPC door need theirs). The soft limit is raised first, as far as twice
    ``wanted`` and the hard limit allow: a container's process often starts at 1,024, which held
    a worker to 512 connections. Calling it again changes nothing."""
    infinity = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == infinity or soft <= 0:
        return wanted
    needed = 2 * wanted
    if soft < needed and (hard == infinity or soft < hard):
        soft = needed if hard == infinity else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return min(wanted, soft // 2)


def grpc_connection_cap(wanted: int) -> int:
    """The gRPC door's share of :func:`connection_cap`: past it, new connections are refused
    (grpcio's own bound), so that a flood of them cannot use up the process's descriptors."""
    return max(1, connection_cap(wanted) // GRPC_SHARE)
