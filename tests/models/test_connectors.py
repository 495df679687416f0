"""Vision connector: bilinear mode equals LlavaOnevision's video features; max / average pooling
equal torch's 2x2 pools (27x27 -> 13x13, 182 tokens per frame with image_newline per row)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from vsalmonn_jax.models import import_hf
from vsalmonn_jax.models.connectors import (
    VisionConnector,
    add_newline,
    pool_grid,
    pooled_side,
    tokens_per_frame,
)
from vsalmonn_jax.models.siglip import SiglipConfig, SiglipVision


def test_bilinear_equals_llava_onevision_video_features():
    hf_cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=4, image_size=70,
                           patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        text_config=dict(model_type="qwen2", vocab_size=64, hidden_size=48, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2),
        vision_feature_layer=-2, vision_feature_select_strategy="full")
    torch_model = LlavaOnevisionForConditionalGeneration(hf_cfg).eval()
    source = import_hf.Source(torch_model.state_dict())
    vcfg = SiglipConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                        image_size=70, patch_size=14, select_layer=-2)
    vision = {"params": import_hf.siglip_params(source, vcfg)}
    adapter = import_hf.vision_connector_params(source)
    pixels = np.random.default_rng(0).normal(size=(2, 3, 70, 70, 3)).astype(np.float32)
    with torch.no_grad():
        out = torch_model.model.get_video_features(
            torch.from_numpy(pixels).permute(0, 1, 4, 2, 3), vision_feature_layer=-2,
            vision_feature_select_strategy="full").pooler_output  # [2, 3 * 9 + 1, 48]
    expected = out[:, :-1].numpy().reshape(2, 3, 9, 48)
    features = SiglipVision(vcfg).apply(vision, jnp.asarray(pixels.reshape(6, 70, 70, 3)))
    connector = VisionConnector(48, grid=5, pool_mode="bilinear", newline="none")
    ours = connector.apply({"adapter": adapter}, features.reshape(2, 3, 25, 32))
    assert ours.shape == (2, 3, 9, 48)  # 5x5 -> ceil(5/2)^2 = 3x3
    np.testing.assert_allclose(np.asarray(ours), expected, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(adapter["image_newline"]), out[0, -1].numpy(), atol=0)


@pytest.mark.parametrize("mode,torch_pool", [("max", torch.nn.functional.max_pool2d),
                                             ("average", torch.nn.functional.avg_pool2d)])
def test_max_and_average_pool_27_to_13(mode, torch_pool):
    x = np.random.default_rng(1).normal(size=(2, 27, 27, 8)).astype(np.float32)
    ours = np.asarray(pool_grid(jnp.asarray(x), mode, 2))
    expected = torch_pool(torch.from_numpy(x).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).numpy()
    assert ours.shape == (2, 13, 13, 8)
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_182_tokens_per_frame_with_row_newlines():
    assert pooled_side(27, "max") == 13 and pooled_side(27, "bilinear") == 14
    assert tokens_per_frame(27, "max", 2, "grid") == 182
    assert tokens_per_frame(27, "bilinear", 2, "grid") == 210
    connector = VisionConnector(16, grid=27, pool_mode="max")
    features = jnp.asarray(np.random.default_rng(2).normal(size=(1, 2, 729, 12)), jnp.float32)
    variables = connector.init(jax.random.PRNGKey(0), features)
    assert set(variables) == {"adapter"}
    out = connector.apply(variables, features)
    assert out.shape == (1, 2, 182, 16)
    newline = np.asarray(variables["adapter"]["image_newline"].unbox())
    rows = np.asarray(out).reshape(1, 2, 13, 14, 16)
    np.testing.assert_array_equal(rows[:, :, :, 13], np.broadcast_to(newline, (1, 2, 13, 16)))
    grid = np.arange(2 * 2 * 2 * 1, dtype=np.float32).reshape(2, 2, 2, 1)
    with_newline = np.asarray(add_newline(jnp.asarray(grid), jnp.array([-1.0])))
    assert with_newline[0, :, 0].tolist() == [0, 1, -1, 2, 3, -1]


def test_pool_mode_validation():
    with pytest.raises(ValueError, match="pool_mode"):
        pooled_side(27, "median")


def test_projector_init_std_is_configurable():
    import flax.linen as nn

    features = jnp.zeros((1, 1, 9, 64), jnp.float32)
    for std in (0.02, 0.125):
        connector = VisionConnector(256, grid=3, pool_stride=1, init_std=std)
        params = nn.unbox(connector.init(jax.random.PRNGKey(0), features))["adapter"]["projector"]
        for layer in ("linear_1", "linear_2"):
            assert abs(np.asarray(params[layer]["kernel"]).std() / std - 1) < 0.05, (layer, std)


def test_cell_embedding_adds_one_learned_vector_per_pooled_cell():
    """connector.cell_embedding (not in the release): each pooled cell's tokens gain its own vector;
    the newlines and everything else are as without it, and without it there is no such parameter."""
    import flax.linen as nn

    features = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 9, 12)), jnp.float32)
    plain = VisionConnector(16, grid=3, pool_stride=1)
    celled = VisionConnector(16, grid=3, pool_stride=1, cell_embedding=True)
    variables = nn.unbox(celled.init(jax.random.PRNGKey(0), features))
    cells = np.asarray(variables["adapter"]["cell_embedding"])          # [3, 3, 16]
    assert cells.shape == (3, 3, 16) and np.abs(cells).max() > 0
    assert "cell_embedding" not in nn.unbox(plain.init(jax.random.PRNGKey(0), features))["adapter"]
    without = {"adapter": {k: v for k, v in variables["adapter"].items() if k != "cell_embedding"}}
    base = np.asarray(plain.apply(without, features)).reshape(2, 3, 3, 4, 16)   # rows of 3 + newline
    got = np.asarray(celled.apply(variables, features)).reshape(2, 3, 3, 4, 16)
    np.testing.assert_allclose(got[..., :3, :], base[..., :3, :] + cells[None, None], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[..., 3, :], base[..., 3, :])
