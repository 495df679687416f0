"""KV-cache generation: jitted prefill + decode loop, greedy / temperature / top-p / top-k.

`generate(model, variables, input_ids=... | inputs_embeds=..., ...)` -> GenerateOutput (decode.py);
`SamplingConfig` (sampling.py); the `caption` command's pieces live in caption_io / caption_run /
captioner / model_load.
"""

from vsalmonn_jax.generate.decode import GenerateOutput, generate, pad_rows
from vsalmonn_jax.generate.sampling import SamplingConfig

__all__ = ["GenerateOutput", "SamplingConfig", "generate", "pad_rows"]
