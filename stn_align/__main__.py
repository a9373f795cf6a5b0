"""``python -m stn_align ...`` is the ``stn-align`` command, e.g. under torchrun:
``torchrun --nproc_per_node 4 -m stn_align train PHOTOS -o MODEL.safetensors``."""

from .cli import app

app(prog_name="stn-align")
