"""The run configs: variants, validation, and the messages when weights or data are missing."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_hf
import transformers

from elmjax import prepare, train
from elmjax.config import load_config
from elmjax.tokenize import text

REPO = Path(__file__).resolve().parents[1]


def test_ecgbyte_512_is_the_1024_config_at_t_512():
    big, small = load_config("ecgbyte_1024"), load_config("configs/ecgbyte_512.py")
    assert small.budget == 512 and big.budget == 1024
    assert (small.name, small.workdir) == ("ecgbyte_512", "runs/ecgbyte_512")
    rest = {k: v for k, v in small.to_dict().items() if k not in ("budget", "name", "workdir")}
    assert rest == {
        k: v for k, v in big.to_dict().items() if k not in ("budget", "name", "workdir")
    }
    demo = load_config("ecgbyte_512:demo,seg=1250")
    assert (demo.name, demo.budget, demo.data.source) == ("ecgbyte_512_demo", 512, "synthetic")
    with pytest.raises(ValueError, match="fixes T = 512"):
        load_config("ecgbyte_512:T=256")
    with pytest.raises(ValueError, match="unknown config arguments"):
        load_config("ecgbyte_1024:demo,big")


def test_paper_config_matches_the_paper():
    c = load_config("ecgbyte_1024")
    assert c.budget == 1024 and c.data.seg_len == 2500 and c.data.target_fs == 250.0
    assert (c.lora.rank, c.lora.alpha, c.lora.dropout) == (16, 32.0, 0.05)
    assert (c.train.batch_size, c.train.epochs, c.train.schedule) == (8, 1.0, "noam")
    assert (c.train.b1, c.train.b2, c.train.eps) == (0.9, 0.99, 1e-8)
    assert (c.train.weight_decay, c.train.clip_norm, c.train.warmup_steps) == (0.01, 1.0, 500)
    assert c.ecg_tokenizer.num_merges == 5000 and not c.ecg_tokenizer.centred_norm
    assert c.model.remat == "nothing_saveable" and c.model.scan_layers


def test_smollm2_variant():
    c = load_config("ecgbyte_1024:demo,smollm2")
    assert c.name == "ecgbyte_1024_demo_smollm2"
    assert c.model.checkpoint == c.text.tokenizer == "checkpoints/SmolLM2-135M-Instruct"
    assert c.text.family == "chatml" and c.lora.rank == 16 and c.model.train_extra_vocab
    assert c.data.source == "synthetic" and c.model.dtype == "float32"
    paper = load_config("ecgbyte_1024:smollm2")
    assert paper.data.source == "ecgqa-ptbxl" and paper.model.dtype == "bfloat16"


@pytest.mark.parametrize(
    "spec, words",
    [
        ("ecgbyte_1024", ["huggingface-cli download meta-llama/Llama-3.2-1B-Instruct"]),
        ("ecgbyte_1024:demo,smollm2", ["import-gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"]),
    ],
)
def test_missing_weights_say_what_to_download(tmp_path, monkeypatch, spec, words):
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here
    cfg = load_config(spec)
    with pytest.raises(train.ConfigError, match="no config.json there. To fix") as info:
        train.check_config(cfg)
    for word in [*words, cfg.model.checkpoint]:
        assert word in str(info.value)


def test_missing_data_says_what_to_download(tmp_path):
    cfg = load_config("ecgbyte_1024")
    cfg.data.root = str(tmp_path / "ptbxl")
    with pytest.raises(prepare.PrepareError, match="physionet.org/content/ptb-xl") as info:
        prepare.ensure_data(cfg)
    assert "--config.data.root=DIR" in str(info.value)


def test_train_cli_paper_config_exits_with_the_download_message(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "elmjax.train", f"--config={REPO}/configs/ecgbyte_1024.py"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: model.checkpoint checkpoints/Llama-3.2-1B-Instruct" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("remat", ["", "nothing_saveable", "dots_saveable"])
def test_remat_takes_a_policy_name_from_the_command_line(remat):
    cfg = load_config("ecgbyte_1024:demo")
    cfg.model.remat = remat  # what --config.model.remat=... does: the field is a string
    train.check_config(cfg)


def test_remat_rejects_unknown_policies():
    cfg = load_config("ecgbyte_1024:demo")
    cfg.model.remat = "save_everything_please"
    with pytest.raises(train.ConfigError, match="jax.checkpoint_policies"):
        train.check_config(cfg)


def tiny_chat_checkpoint(path: Path) -> Path:
    """A SmolLM2-like directory: a ChatML tokenizer trained here and a tiny random Llama."""
    corpus = ["Does this ECG show sinus rhythm? yes no atrial fibrillation bundle branch block"]
    text.train_local_tokenizer(corpus * 20, path, vocab_size=300, family="chatml")
    vocab = len(transformers.AutoTokenizer.from_pretrained(path))
    shapes = {**tiny_hf.SHAPES, "vocab_size": vocab, "max_position_embeddings": 512}
    config = transformers.LlamaConfig(**shapes, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_smollm2_variant_fine_tunes_a_checkpoint_with_lora(tmp_path):
    ckpt = tiny_chat_checkpoint(tmp_path / "smol")
    cfg = load_config("ecgbyte_1024:demo,smollm2")
    cfg.model.checkpoint = cfg.text.tokenizer = str(ckpt)
    cfg.data.root = str(tmp_path / "data")
    cfg.data.generate_ecgs = 30
    cfg.data.workers = 1
    cfg.ecg_tokenizer.num_merges = 40
    cfg.budget = 256
    cfg.train.steps = 3
    cfg.train.batch_size = 2
    cfg.train.eval_every = 0
    cfg.eval.after_training = False
    metrics = train.train(cfg, tmp_path / "run")
    assert metrics["step"] == 3 and all(math.isfinite(v) for v in metrics["losses"].values())
    manifest = prepare.load_manifest(tmp_path / "run")
    assert manifest["vocab"]["text_vocab_size"] >= 256
    # adapter-only checkpoint: LoRA factors and the ECG rows, not the frozen base
    model, step = train.load_trained(cfg, tmp_path / "run")
    assert step == 3 and model.config.family == "llama"
