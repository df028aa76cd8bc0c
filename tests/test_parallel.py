"""Logical-axis rules, and sharded models on 8 fake CPU devices (in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
import torch
import transformers
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from elmjax import parallel

MESH = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def test_logical_rules():
    to_mesh = parallel.logical_to_mesh
    assert to_mesh(("vocab", "embed"), MESH) == PartitionSpec("tensor", "fsdp")
    assert to_mesh(("embed", "heads"), MESH) == PartitionSpec("fsdp", "tensor")
    # A mesh axis is used once per array: the batch takes fsdp, the width stays whole.
    assert to_mesh(("batch", "seq", "embed"), MESH) == PartitionSpec(("data", "fsdp"), None, None)
    assert to_mesh(("batch", "seq", "heads", "head_dim"), MESH) == PartitionSpec(
        ("data", "fsdp"), None, "tensor", None
    )
    assert to_mesh(("layers", "embed", "mlp"), MESH) == PartitionSpec(None, "fsdp", "tensor")
    # Not divisible -> replicated; no mesh -> the rule as written.
    assert to_mesh(("vocab", "embed"), MESH, shape=(259, 64)) == PartitionSpec(None, "fsdp")
    assert to_mesh(("batch", None), MESH, shape=(6, 3)) == PartitionSpec(None, None)
    assert to_mesh(("batch", "seq"), MESH, shape=(8, 3)) == PartitionSpec(("data", "fsdp"), None)
    assert to_mesh(("vocab", "embed")) == PartitionSpec("tensor", "fsdp")
    # Axes missing from the mesh are dropped.
    tp_only = AbstractMesh((4,), ("tensor",), axis_types=(AxisType.Auto,))
    assert to_mesh(("batch", "mlp"), tp_only) == PartitionSpec(None, "tensor")
    with pytest.raises(KeyError, match="no rule"):
        to_mesh(("width",), MESH)
    names = {name for name, _ in parallel.LOGICAL_RULES}
    assert {"batch", "seq", "embed", "heads", "kv_heads", "mlp", "vocab"} <= names


def test_constrain_is_a_no_op_without_mesh_and_make_mesh_checks_sizes():
    x = jnp.ones((4, 8))
    assert parallel.constrain(x, ("batch", "embed")) is x
    mesh = parallel.make_mesh()
    assert dict(mesh.shape) == {"data": len(jax.devices()), "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="needs 3 devices"):
        parallel.make_mesh(data=1, fsdp=3, tensor=1)
    with pytest.raises(ValueError, match="at most one"):
        parallel.make_mesh(data=-1, fsdp=-1)


SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jax.sharding import PartitionSpec as P
    from elmjax import parallel
    from elmjax.models import hf
    from elmjax.models.llm import LLM, LLMConfig
    from elmjax.models.lora import apply_lora, trainable_filter

    assert jax.device_count() == 8, jax.devices()
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    tokens = np.random.default_rng(0).integers(0, 260, (4, 16)).astype(np.int32)

    @nnx.jit
    def forward(model, tokens):
        return model(tokens)

    def sharded(x):
        return jax.device_put(x, jax.sharding.NamedSharding(
            mesh, parallel.logical_to_mesh(("batch", "seq"), mesh, x.shape)))

    with jax.default_matmul_precision("highest"):
        # 1. A transformers checkpoint (Qwen 2, tied, 4 extra rows) loaded straight into its
        #    shardings, with stacked layers; the same model on one device is the reference.
        path = sys.argv[1]
        plain, config = hf.load_hf(path, extra_vocab=4, scan_layers=True)
        loaded, _ = hf.load_hf(path, extra_vocab=4, scan_layers=True, mesh=mesh)
        up = loaded.layers.mlp.up_proj.kernel[...]
        assert up.sharding.spec == P(None, "fsdp", "tensor"), up.sharding.spec
        assert up.addressable_shards[0].data.shape == (2, 32, 64)  # [layers, embed/2, mlp/2]
        emb = loaded.embed_tokens.embedding[...]
        assert emb.sharding.spec == P("tensor", "fsdp") and len(emb.sharding.device_set) == 8
        assert loaded.embed_tokens.extra[...].sharding.spec == P("tensor", "fsdp")
        assert loaded.norm.scale[...].sharding.spec == P("fsdp")
        ref = np.asarray(forward(plain, tokens))
        with jax.set_mesh(mesh):
            out = forward(loaded, sharded(tokens))
        assert out.sharding.spec[0] == ("data", "fsdp"), out.sharding.spec
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)

        # 2. A random model built directly sharded equals the same model built on one device.
        created = parallel.create_sharded(lambda: LLM(config, rngs=nnx.Rngs(0)), mesh)
        q = created.layers.self_attn.q_proj.kernel[...]
        assert q.sharding.spec == P(None, "fsdp", "tensor"), q.sharding.spec
        with jax.set_mesh(mesh):  # creating under a mesh works too (no eager sharding)
            single = nnx.jit(lambda: LLM(config, rngs=nnx.Rngs(0)))()
        for (path, x), (_, y) in zip(
            nnx.to_flat_state(nnx.state(created)), nnx.to_flat_state(nnx.state(single))
        ):
            np.testing.assert_allclose(np.asarray(x.get_value()), np.asarray(y.get_value()),
                                       atol=1e-6, err_msg=str(path))

        # 3. LoRA on the sharded model: adapters sharded too; a train step moves only them.
        apply_lora(loaded, rank=4, alpha=8.0, dropout=0.0, rngs=nnx.Rngs(1))
        parallel.shard_model_state(loaded, mesh)
        a = loaded.layers.self_attn.q_proj.lora_a[...]
        assert a.sharding.spec == P(None, "fsdp", None), a.sharding.spec
        opt = nnx.Optimizer(loaded, optax.adamw(1e-2), wrt=trainable_filter())
        before = np.asarray(up)

        @nnx.jit
        def step(model, opt, tokens):
            def loss_fn(model):
                logits = model(tokens[:, :-1])
                return optax.softmax_cross_entropy_with_integer_labels(
                    logits, tokens[:, 1:]).mean()
            loss, grads = nnx.value_and_grad(
                loss_fn, argnums=nnx.DiffState(0, trainable_filter()))(model)
            opt.update(model, grads)
            return loss

        with jax.set_mesh(mesh):
            loss = step(loaded, opt, sharded(tokens))
        assert np.isfinite(float(loss))
        np.testing.assert_array_equal(np.asarray(loaded.layers.mlp.up_proj.kernel[...]), before)
        b = loaded.layers.self_attn.q_proj.lora_b[...]
        assert np.abs(np.asarray(b)).max() > 0 and b.sharding.spec == P(None, None, "tensor")
    print("OK")
    """
)


def test_sharded_on_8_fake_devices(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.strip().endswith("OK")
