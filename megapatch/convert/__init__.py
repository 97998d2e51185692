"""Checkpoint tools: Megatron dist checkpoints <-> Hugging Face Llama, resharding, inspection.

``megapatch convert export|import|reshard`` and ``megapatch ckpt info`` (:mod:`.cli`):

* :mod:`.weight_map` - the one Megatron <-> Hugging Face Llama weight map (both directions);
* :mod:`.hf_config` - ``config.json`` <-> :class:`~megapatch.config.ModelConfig`;
* :mod:`.hf_tokenizer` - Hugging Face tokenizer files from a sentencepiece model;
* :mod:`.safetensors_io` - streaming safetensors writer and per-tensor reader;
* :mod:`.dist_io` - piecewise loads from, and a disk-staged writer of, dist checkpoints;
* :mod:`.export`, :mod:`.importer`, :mod:`.reshard`, :mod:`.info` - the tools.

Nothing heavy is imported here, so ``megapatch --help`` stays fast.
"""
