"""Planning a run for another machine: per-GPU memory, step time and cost, from the config.

* :mod:`.memory`: parameters per rank (counted from the model shapes the way megatron-core
  shards them), model state (weights, gradients, optimizer state, FP8 weight copies) and
  activations per micro-batch, term by term, for the implementation the run will use;
  micro-batches in flight under 1F1B / interleaved schedules; the peak per pipeline rank.
* :mod:`.cost`: the GPU table, step time, tokens/s/GPU, MFU, wall time and GPU-hours from the
  project's one FLOP count (``megapatch.training.flops.flops_per_step``).
* :mod:`.measure`: the same terms measured on a real ``PatchGPTModel`` (CPU), for the tests and
  ``benchmarks/bench_memory.py``.

``megapatch plan`` (:mod:`megapatch.commands.plan`) prints and writes the report.
"""
