"""End-to-End ECG-Byte at token budget T = 512 (the paper's smaller budget).

    python -m elmjax.train --config=configs/ecgbyte_512.py
    python -m elmjax.train --config=configs/ecgbyte_512.py:demo

Everything is ``configs/ecgbyte_1024.py`` (see its docstring for the data, tokenizers, model and
training settings) with the token budget T = 512: the ECG keeps what the text leaves of 512
tokens, under the same ``head`` truncation at training and evaluation. Its arguments are the
same (``demo``, ``smollm2``, ``seg=``), except ``T=``, which this file fixes. Run names and
default run directories are ``ecgbyte_512[_demo|_smollm2]``.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from elmjax.config import load_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``configs/ecgbyte_1024.py`` with ``T=512``; ``arg`` as there (without ``T=``)."""
    parts = [p for p in (arg or "").split(",") if p]
    if any(p.strip().startswith("T=") for p in parts):
        raise ValueError("ecgbyte_512 fixes T = 512; use configs/ecgbyte_1024.py:T=N instead")
    base = Path(__file__).with_name("ecgbyte_1024.py")
    c = load_config(f"{base}:{','.join([*parts, 'T=512'])}")
    c.name = c.name.replace("ecgbyte_1024", "ecgbyte_512", 1)
    c.workdir = "runs/" + c.name
    return c
