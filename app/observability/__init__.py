"""Observability: Prometheus metrics and logs carrying request ids."""
