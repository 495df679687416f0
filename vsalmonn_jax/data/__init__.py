"""Media decoding, model features, chat template, JSONL records, grain pipeline, synthetic data.

Typical use (see each module's docstring for details):
    info = synthetic.build_dataset(out_dir, n_train, n_val, n_test, cfg=synthetic.synthetic_config(config))
    records = records.load_records(f"{out_dir}/sft_train.jsonl")     # or records.load_split(config, "train")
    loader = pipeline.make_loader(records, config)                   # config.data.tokenizer = f"{out_dir}/tokenizer"
    for batch in loader: ...                                         # the shared batch contract (collate.py)
    state = loader.get_state(); loader.set_state(state)              # JSON-able, orbax JsonSave
In-memory rows (e.g. DPO pairs) become records with `records.from_rows(rows, "preference", root)`.
Files: media (decode), features (SigLIP / log-mel), text (ChatML), records (schemas), example
(record -> example), collate (padding), pipeline (grain), quarantine, cache (npz), encode (write
media), synthetic* (the synthetic data set), tokenizer_build, event_grammar (caption sentences).
"""
