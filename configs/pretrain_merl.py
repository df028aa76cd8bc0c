"""Stage 1 of 2-Stage Scratch: pretrain the merl ECG encoder from scratch.

    python -m elmjax.pretrain --config=configs/pretrain_merl.py        # the paper run
    python -m elmjax.pretrain --config=configs/pretrain_merl.py:demo   # CPU, about 1-2 minutes

MERL: ResNet-101 (1-D) trained with the CLIP-style ECG-report loss against a frozen
MedCPT-Query-Encoder (pooler -> MLP 768 -> 256, tau 0.07, global batch) plus the uni-modal
alignment of two dropout views of the ECG embedding.

Paper settings (full run): MIMIC-IV-ECG records (``data/mimic-iv-ecg``, split by patient),
250 Hz, 5-s segments (1250 samples, the reference's ecg-qa_mimic-iv-ecg_mapped_1250), global
batch 256, 50 epochs, AdamW lr 1e-4 (warm-up 2000 steps, cosine), weight decay 0.05.

The text encoder must be a local Hugging Face directory (``pretrain.text_encoder``, default
``checkpoints/MedCPT-Query-Encoder``; the error message says how to download it). With
``demo`` it is ``''``: a WordPiece tokenizer is trained on the train reports and a RANDOM tiny
BERT (width 64, 2 layers) stands in for MedCPT, so the demo checks the machinery, not the
medical text knowledge. Nothing is ever downloaded.

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
    return default_config("merl_resnet", arg)
