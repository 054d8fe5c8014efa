"""An example of your own model package: ``nets.TinyMLP`` (a plain ``nn.Module``, named in the
config as ``my_models.nets:TinyMLP``) and ``scorer.Scorer`` (registered with ``@register`` and
found through ``MODELPORT_MODEL_PACKAGES=my_models``)."""
