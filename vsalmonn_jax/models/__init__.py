"""Pure Flax linen modules: qwen2 (LLM), siglip (vision), whisper (audio), qformer, connectors, av_llm."""
