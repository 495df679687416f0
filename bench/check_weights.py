"""check-weights at the real 7B shapes without the real files: LLaVA-OneVision-Qwen2-7B and
Whisper-large-v3 tensor names / shapes from transformers models built on the meta device, written as
sparse safetensors (true headers, no data on disk), then `check` timed against reading the headers.

  python bench/check_weights.py [--dir /tmp/vs_ckw]   ->  BENCH check_weights_7b_s / ..._vs_headers
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import struct
import sys
import tempfile
import time


def sparse_safetensors(path: pathlib.Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A safetensors file (bf16) whose data region is a hole: headers are real, nothing is written."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2
        for d in shape:
            size *= int(d)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def meta_shapes(model_cls, config) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        model = model_cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build(root: pathlib.Path, config) -> None:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        WhisperConfig,
        WhisperModel,
    )

    m = config.model
    v, llm, a = m.vision, m.llm, m.audio
    llava = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=v.hidden_size,
                           intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                           num_attention_heads=v.num_heads, image_size=v.image_size,
                           patch_size=v.patch_size),
        text_config=dict(model_type="qwen2", vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
                         intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
                         num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
                         tie_word_embeddings=False))
    whisper = WhisperConfig(num_mel_bins=a.num_mel_bins, d_model=a.d_model, encoder_layers=a.num_layers,
                            encoder_attention_heads=a.num_heads, encoder_ffn_dim=a.ffn_dim,
                            decoder_layers=a.num_layers, decoder_attention_heads=a.num_heads,
                            decoder_ffn_dim=a.ffn_dim, max_source_positions=a.max_source_positions,
                            vocab_size=51866)
    for name, cls, cfg in (("llava", LlavaOnevisionForConditionalGeneration, llava),
                           ("whisper", WhisperModel, whisper)):
        (root / name).mkdir(parents=True, exist_ok=True)
        sparse_safetensors(root / name / "model.safetensors", meta_shapes(cls, cfg))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="")
    args = p.parse_args()
    from vsalmonn_jax.commands.check_weights import check
    from vsalmonn_jax.config import load_config
    from vsalmonn_jax.safetensors_io import SafetensorsReader

    root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="vs_ckw_"))
    config = load_config("7b")
    build(root, config)
    config.model.pretrained.llava = str(root / "llava")
    config.model.pretrained.whisper = str(root / "whisper")
    start = time.perf_counter()
    for part in ("llava", "whisper"):
        SafetensorsReader(root / part)
    headers = time.perf_counter() - start
    start = time.perf_counter()
    report = io.StringIO()
    ok = check(config, out=report)
    seconds = time.perf_counter() - start
    print(report.getvalue(), file=sys.stderr)
    assert ok, "the 7B headers should be complete for configs/7b.py"
    print(f"BENCH check_weights_7b_s {seconds:.2f}")
    print(f"BENCH check_weights_7b_vs_headers {seconds / max(headers, 1e-9):.1f}")


if __name__ == "__main__":
    main()
