"""Registered model classes: one ``nn.Module`` per module, each decorated with ``@register``."""
