"""Loading run configs (``configs/X.py[:arg]``) outside absl, as ``--config=`` does.

Scripts take ``--config=configs/X.py[:arg]`` through absl's ``config_flags``; code that needs a
config without flags (the demo, notebooks, tests) calls :func:`load_config` with the same string.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import ml_collections

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the repository's configs/


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``"configs/ecgbyte_1024.py:demo"`` (or ``"ecgbyte_1024:demo"``) -> its ConfigDict.

    A bare name is looked up in the repository's ``configs/`` directory.
    """
    path_part, _, arg = spec.partition(":")
    path = Path(path_part)
    if not path.suffix:
        path = CONFIG_DIR / f"{path_part}.py"
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"_elmjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config(arg) function")
    return module.get_config(arg or None)


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a run was trained with (``WORKDIR/config.json``, written by training)."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train the run first, or pass --config")
    return ml_collections.ConfigDict(json.loads(path.read_text()))
