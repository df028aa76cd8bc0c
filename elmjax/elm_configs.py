"""The configs of the signal and image rows of the paper's comparison, in one place.

``configs/signal_<encoder>_1024.py`` and ``configs/image_<tower>_1024.py`` each call
:func:`elm_config`. A run is End-to-End LLaVA: an ECG encoder (frozen by default) turns each
ECG into one pooled vector, a linear projector maps it into the LLM, and it replaces the
embedding of one ``<signal>`` placeholder token at the start of the first user turn (the
reference's layout); the LLM is trained with LoRA as in ``configs/ecgbyte_1024.py``, whose data,
text, LoRA and training settings these runs share (one example per row: ``train.fit="pad"``).

``encoder.checkpoint`` names the pretrained encoder:

* signal (``merl_resnet``, ``stmem``, ``mtae``, ``mlae``, ``vit1d``): the ``WORKDIR/encoder``
  export of ``python -m elmjax.pretrain --config=configs/pretrain_<encoder>.py`` (2-Stage
  Scratch: stage 1 is that command, stage 2 this run);
* image (``clip``, ``siglip``, ``vit``): a Hugging Face directory (``CLIPModel`` /
  ``SiglipModel`` / ``ViTModel``), preprocessed without the centre crop that cut leads off in
  the reference.

``:demo`` runs on the built-in synthetic set on CPU: all 12 leads, 10 s at 125 Hz, 400
steps (the image demo: a 6 x 2 printout at 64 x 64), with a tiny encoder made here from
scratch (no pretrained weights can be downloaded) and trained together with the projector and
the tiny decoder. It shows the whole path working, not the paper's numbers.
"""

from __future__ import annotations

import ml_collections

from elmjax.config import load_config

SIGNAL_ENCODERS = ("merl_resnet", "stmem", "mtae", "mlae", "vit1d")
IMAGE_TOWERS = {  # tower -> the paper's Hugging Face checkpoint
    "clip": "openai/clip-vit-base-patch32",
    "siglip": "google/siglip-base-patch16-224",
    "vit": "google/vit-base-patch16-224-in21k",
}


def _parse(arg: str | None) -> list[str]:
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    unknown = set(parts) - {"demo"}
    if unknown:
        raise ValueError(f"unknown config arguments {sorted(unknown)}; known: demo")
    return parts


def elm_config(representation: str, encoder: str, arg: str | None = None):
    """The run config of ``encoder`` on the ``representation`` path (see the module doc)."""
    demo = "demo" in _parse(arg)
    c = load_config("ecgbyte_1024" + (":demo" if demo else ""))
    short = "merl" if encoder == "merl_resnet" else encoder  # the config file's name
    c.name = f"{representation}_{short}_1024" + ("_demo" if demo else "")
    c.workdir = "runs/" + c.name
    c.representation = representation

    d = c.data
    d.ecg_tokens = 1  # one pooled vector -> one <signal> placeholder (the paper)
    if demo:
        d.leads = ()  # the encoders read all 12 leads
        d.group_questions = 1  # one example (one ECG) per row
    if representation == "image":
        d.image_layout = "6x2"  # the reference's printout
        d.image_size = 64 if demo else 224

    c.encoder = ml_collections.ConfigDict()
    c.encoder.name = encoder
    if representation == "signal":
        c.encoder.checkpoint = "" if demo else f"runs/pretrain_{short}/encoder"
        c.encoder.download_hint = (
            f"pretrain it first: python -m elmjax.pretrain --config=configs/pretrain_{short}.py"
        )
    else:
        c.encoder.checkpoint = "" if demo else f"checkpoints/{IMAGE_TOWERS[encoder].split('/')[1]}"
        c.encoder.download_hint = (
            f"huggingface-cli download {IMAGE_TOWERS[encoder]} --local-dir {c.encoder.checkpoint}"
        )
    c.encoder.tiny = demo  # a fresh CPU-sized encoder when there is no checkpoint
    c.encoder.output = "pooled"  # or "tokens" (then set data.ecg_tokens to the token count)
    c.encoder.train = demo  # End-to-End LLaVA freezes the pretrained encoder
    c.projector = ml_collections.ConfigDict({"kind": "linear"})  # or "mlp"

    c.train.fit = "pad"
    if demo:
        c.budget = 128  # a demo example is about 55 text tokens and one placeholder
        c.train.steps = 400
        c.train.batch_size = 16
        c.train.lr = 1e-3
    return c
