"""Data pipeline: corpus -> sentencepiece -> Megatron indexed dataset -> stage-aware samples.

Modules (import them directly; this package imports nothing heavy):

* :mod:`~megapatch.data.corpus`: the embedded corpus and readers for JSONL / text / .gz files;
* :mod:`~megapatch.data.tokenizer`: train or load sentencepiece models, vocab padding;
* :mod:`~megapatch.data.preprocess`: corpus -> PREFIX.bin/.idx (``megapatch preprocess``);
* :mod:`~megapatch.data.stages`: stage specs and their windows on the planned token stream;
* :mod:`~megapatch.data.stream`: the planned token stream over megatron-core's datasets;
* :mod:`~megapatch.data.datasets`: per-stage sample datasets (``build_stage_datasets``);
* :mod:`~megapatch.data.sampler`: the resumable data-parallel batch sampler;
* :mod:`~megapatch.data.config`: config dataclasses and their Megatron-style flags.
"""
