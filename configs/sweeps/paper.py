"""The paper's representation study as one sweep (``python -m elmjax.study``).

    python -m elmjax.study --sweep=configs/sweeps/paper.py --workdir=runs/study       # the paper
    python -m elmjax.study --sweep=configs/sweeps/paper.py:demo --workdir=runs/study_demo  # CPU

Grid: every representation row (``rows``: symbolic ECG-Byte, the four signal encoders, the three
image towers) x ECG segment length (``seg_lens``: 1250 and 2500 samples at 250 Hz, 5 and 10 s)
x token budget T (``budgets``: 256, 512, 1024, 2048; the symbolic row only, since a signal or
image run spends one placeholder on its ECG whatever T is). Each run trains with its row's
config (``configs/<row config>.py``) and is then evaluated on the test split under the real
ECG, the ECG-utilisation ablations (``ablate``) and the perturbations (``perturb``: noise,
baseline wander, mains at the presets' moderate level, and all three; ``elmjax.ecg.perturb``),
over ``seeds`` with the reference's sampling (temperature 0.6, top-p 0.9, ``reference-notes.md``
section 5). Signal rows are 2-Stage Scratch: the sweep first pretrains each encoder
(``pretrain``: ``configs/pretrain_<encoder>.py`` at the row's segment length) and stage 2
starts from its export. Image rows start from the Hugging Face towers their configs name.

``overrides`` apply to every run, as nested fields (e.g. ``{"data": {"root": "/data/ptbxl"}}``;
``data.root = ""`` means one shared ``DIR/data``); any field can also be set on the command
line: ``--sweep.seeds=0,1``.

``demo``: the built-in synthetic set (1,500 ECGs, 125 Hz: 5- and 10-s segments of 625 and
1,250 samples), the symbolic row at T = 256 and 512, the ST-MEM signal row and the ViT image
row with fresh tiny encoders trained end to end, 2-layer decoders; each run 120 steps,
evaluated on 160 test questions with one seed, greedy. 12.5 minutes on 2 cores. It shows
every table and plot of the study, not the paper's numbers.
"""

from __future__ import annotations

import ml_collections

PAPER_ROWS = {  # row -> its run config
    "symbolic": "ecgbyte_1024",
    "signal_merl": "signal_merl_1024",
    "signal_stmem": "signal_stmem_1024",
    "signal_mtae": "signal_mtae_1024",
    "signal_mlae": "signal_mlae_1024",
    "image_clip": "image_clip_1024",
    "image_siglip": "image_siglip_1024",
    "image_vit": "image_vit_1024",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    demo = arg == "demo"
    if arg not in (None, "", "demo"):
        raise ValueError(f"unknown sweep argument {arg!r}; known: demo")
    s = ml_collections.ConfigDict()
    s.name = "paper" + ("_demo" if demo else "")
    if demo:
        s.rows = {
            "symbolic": "ecgbyte_1024:demo",
            "signal_stmem": "signal_stmem_1024:demo",
            "image_vit": "image_vit_1024:demo",
        }
        s.pretrain = {}  # the demo's encoders are fresh and trained end to end
    else:
        s.rows = dict(PAPER_ROWS)
        s.pretrain = {row: f"pretrain_{row.split('_')[1]}" for row in PAPER_ROWS if "signal" in row}
    s.budgets = (256, 512) if demo else (256, 512, 1024, 2048)  # symbolic row only
    s.main_budget = 512 if demo else 1024  # the symbolic run the representations are compared at
    s.seg_lens = (625, 1250) if demo else (1250, 2500)
    s.target_fs = 125.0 if demo else 250.0
    s.split = "test"
    s.ablate = "zeros,shuffled,text_only"
    s.perturb = (
        "noise_moderate,baseline_wander_moderate"
        if demo
        else "noise_moderate,baseline_wander_moderate,powerline_moderate,combined_moderate"
    )
    s.seeds = "0" if demo else "0,1,2,3,4"
    s.temperature = 0.0 if demo else 0.6
    s.top_p = 1.0 if demo else 0.9
    s.limit = 160 if demo else 0  # test examples per run (0: all)
    s.bertscore = True
    s.bertscore_model = ""  # roberta-large (the paper) from a local directory; "": MiniLM-L6
    s.paper_compat = False
    s.alpha = 0.05  # significance level of the paired tests
    # every run's config; the demo's runs are shorter than the :demo configs' own
    # every run's config, as nested fields; the demo's runs are shorter than the :demo configs'
    s.overrides = (
        {
            "data": {"generate_ecgs": 1500, "root": ""},  # "": DIR/data, shared by every run
            "train": {"steps": 120},
            "model": {"random": {"num_layers": 2}},
        }
        if demo
        else {}
    )
    return s
