"""Media decoding, model features, chat template, JSONL records, grain pipeline, synthetic data."""
