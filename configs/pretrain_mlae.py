"""Stage 1 of 2-Stage Scratch: pretrain the mlae ECG encoder from scratch.

    python -m elmjax.pretrain --config=configs/pretrain_mlae.py        # the paper run
    python -m elmjax.pretrain --config=configs/pretrain_mlae.py:demo   # CPU, about 1-2 minutes

MLAE (masked lead autoencoder): ViT-B over whole leads (one lead = one token), 256-d 4-block
decoder, MSE on the 75 % masked leads.

Paper settings (full run): MIMIC-IV-ECG records (``data/mimic-iv-ecg``, split by patient),
250 Hz, 5-s segments (1250 samples, the reference's ecg-qa_mimic-iv-ecg_mapped_1250), global
batch 256, 50 epochs, AdamW lr 1e-4 (warm-up 2000 steps, cosine), weight decay 0.05.

``demo``: the built-in synthetic set (4,000 ECGs under ``runs/demo/data``, generated when
missing, as configs/ecgbyte_1024.py:demo; PTB-XL's published split), a tiny encoder
(``ecg_encoders.tiny_config``, width 32), batch 32, 300 steps.

The encoder ends in ``WORKDIR/encoder/``; stage 2 reads it with
``elmjax.pretrain.load_pretrained_encoder(path)``. Every field is in
``elmjax.pretrain.default_config`` and can be overridden: ``--config.train.batch_size=128``.
"""

from __future__ import annotations

import ml_collections

from elmjax.pretrain import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The run's one config object; ``arg``: ``demo`` (see the module docstring)."""
    return default_config("mlae", arg)
