"""KV-cache generation: jitted prefill + decode loop, greedy / temperature / top-p / top-k."""
