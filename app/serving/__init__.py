"""The serving core: model classes, safe weights, runtimes, batching, versions, inference.

It never imports a web framework: it raises :mod:`app.errors` and each front door renders them.
"""

from app.serving.catalog import Acceptance, Forward, ImageInput, Input, register

__all__ = ["Acceptance", "Forward", "ImageInput", "Input", "register"]
