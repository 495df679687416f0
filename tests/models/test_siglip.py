"""SigLIP tower parity: our features equal transformers.SiglipVisionModel hidden_states[-2] (fp32)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from vsalmonn_jax.models import import_hf
from vsalmonn_jax.models.siglip import SiglipConfig, SiglipVision, num_params


def _tiny(frame_chunk=0, select_layer=-2):
    hf_cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, image_size=56, patch_size=14,
                                layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    torch_model = SiglipVisionModel(hf_cfg).eval()
    cfg = SiglipConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                       image_size=56, patch_size=14, select_layer=select_layer,
                       frame_chunk=frame_chunk)
    source = import_hf.Source(torch_model.state_dict())
    return torch_model, cfg, {"params": import_hf.siglip_params(source, cfg)}


@pytest.mark.parametrize("frame_chunk", [0, 2])
def test_siglip_matches_transformers_hidden_states_minus_2(frame_chunk):
    torch_model, cfg, variables = _tiny(frame_chunk)
    pixels = np.random.default_rng(0).normal(size=(5, 56, 56, 3)).astype(np.float32)
    with torch.no_grad():
        out = torch_model(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    expected = out.hidden_states[-2].numpy()  # [5, 16, 32]
    ours = np.asarray(SiglipVision(cfg).apply(variables, jnp.asarray(pixels)))
    assert ours.shape == (5, 16, 32)
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-5)


def test_siglip_drops_last_layer_and_counts_params():
    _, cfg, variables = _tiny()
    assert cfg.used_layers == 2
    leaves = jax.tree.leaves(variables)
    assert sum(x.size for x in leaves) == num_params(cfg)
    assert variables["params"]["layers"]["q_proj"]["kernel"].shape == (2, 32, 32)


def test_position_init_std_scales_only_the_random_positions():
    """vision.position_init_std: the learned positions' std at random init (0.02 = SigLIP's own);
    nothing else in the tower changes."""
    _, cfg, _ = _tiny()
    pixels = jnp.zeros((1, 56, 56, 3))
    init = {s: nn.unbox(SiglipVision(dataclasses.replace(cfg, position_init_std=s)).init(
        jax.random.PRNGKey(0), pixels)) for s in (0.02, 1.0)}
    for s, variables in init.items():
        std = float(np.std(variables["params"]["embeddings"]["position_embedding"]))
        assert abs(std - s) < 0.2 * s
    rest = [{k: v for k, v in init[s]["params"].items() if k != "embeddings"} for s in (0.02, 1.0)]
    jax.tree.map(np.testing.assert_array_equal, rest[0], rest[1])
    np.testing.assert_array_equal(init[0.02]["params"]["embeddings"]["patch_embedding"],
                                  init[1.0]["params"]["embeddings"]["patch_embedding"])


def test_siglip_rejects_wrong_image_size():
    _, cfg, variables = _tiny()
    with pytest.raises(ValueError, match="image_size"):
        SiglipVision(cfg).apply(variables, jnp.zeros((1, 28, 28, 3)))


def test_frame_chunks_bound_the_live_activations():
    """110 frames in chunks of 8 need a fraction of the temporary memory of all frames at once."""
    cfg = SiglipConfig(hidden_size=32, intermediate_size=256, num_layers=3, num_heads=8,
                       image_size=56, patch_size=14)  # activations >> pixels, as at 384 px
    pixels = jax.ShapeDtypeStruct((110, 56, 56, 3), jnp.float32)

    def temp_bytes(chunk):
        model = SiglipVision(dataclasses.replace(cfg, frame_chunk=chunk))
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), pixels)
        compiled = jax.jit(model.apply).lower(variables, pixels).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(0), temp_bytes(8)
    assert chunked * 4 < whole, (chunked, whole)
