"""End-to-End LLaVA with the siglip vision tower on the rendered 12-lead printout (image path).

    python -m elmjax.train --config=configs/image_siglip_1024.py        # needs the HF checkpoint
    python -m elmjax.train --config=configs/image_siglip_1024.py:demo   # CPU, synthetic set

Every setting and the demo are described in :mod:`elmjax.elm_configs`.
"""

from elmjax.elm_configs import elm_config


def get_config(arg=None):
    return elm_config("image", "siglip", arg)
