"""End-to-End LLaVA / 2-Stage Scratch stage 2 with the mtae ECG encoder (signal path).

    python -m elmjax.pretrain --config=configs/pretrain_mtae.py    # stage 1 (the encoder)
    python -m elmjax.train --config=configs/signal_mtae_1024.py    # stage 2
    python -m elmjax.train --config=configs/signal_mtae_1024.py:demo  # CPU, synthetic set

Every setting and the demo are described in :mod:`elmjax.elm_configs`.
"""

from elmjax.elm_configs import elm_config


def get_config(arg=None):
    return elm_config("signal", "mtae", arg)
