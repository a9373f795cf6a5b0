"""Shipped models: ``NAME.safetensors`` with a model card ``NAME.md`` each (installed as ``stn_align.models``)."""
