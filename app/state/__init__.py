"""Shared state: the version database and the blob store."""
