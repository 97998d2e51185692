#!/usr/bin/env python
"""Conversion time and memory at full size: HF Llama -> megapatch checkpoint -> HF Llama.

Writes a Hugging Face Llama checkpoint with random weights of a real model's shapes (streamed,
one layer at a time, bf16 by default), then times ``megapatch convert import`` and ``megapatch
convert export`` as separate processes while sampling the memory of their process trees:

* peak anonymous memory of the process tree (``Pss_Anon`` summed over the tool and its helper
  processes, so pages shared by forked writers count once): what the conversion really holds;
* peak resident memory of the largest process (``VmHWM``), which also counts file pages mapped
  by the staged writer (page cache the kernel can drop).

The re-exported tensors are compared with the source by SHA-256, tensor by tensor, so the run
also checks that a full-size round trip is lossless. Writes JSON under benchmarks/results/.

    python benchmarks/bench_convert.py --model llama2-7b --workdir /big/disk/tmp
    python benchmarks/bench_convert.py --model tinyllama-1.1b
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megapatch.convert.hf_config import model_config_from_hf  # noqa: E402
from megapatch.convert.safetensors_io import (  # noqa: E402
    ShardedSafetensorsWriter,
    open_hf_checkpoint,
    read_tensor,
)
from megapatch.convert.weight_map import LlamaDims, WeightMap  # noqa: E402

MODELS = {
    "llama2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0, rms_norm_eps=1e-5,
    ),
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
    ),
    "tinyllama-1.1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, rope_theta=10000.0, rms_norm_eps=1e-5,
    ),
}  # fmt: skip


def write_random_hf(out: str, hf_cfg: dict, dtype: torch.dtype) -> dict[str, str]:
    """A random-weight HF Llama directory; returns the SHA-256 of every tensor."""
    os.makedirs(out, exist_ok=True)
    wmap = WeightMap(LlamaDims.from_model_config(model_config_from_hf(hf_cfg, "config.json")))
    plan = [(n, s, dtype) for n, s in wmap.hf_shapes().items()]
    writer = ShardedSafetensorsWriter(out, plan, 5 * 10**9)
    gen = torch.Generator().manual_seed(0)
    digests = {}
    for name, shape, _ in plan:
        t = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        writer.write(name, t)
        digests[name] = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()
    writer.close()
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dict(hf_cfg, torch_dtype=str(dtype).replace("torch.", "")), f, indent=2)
    return digests


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _status(pid: int) -> dict[str, int]:
    vals = {}
    for path, keys in (
        (f"/proc/{pid}/status", ("VmHWM",)),
        (f"/proc/{pid}/smaps_rollup", ("Pss_Anon",)),
    ):
        try:
            with open(path) as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in keys:
                        vals[key] = int(rest.split()[0]) * 1024
        except OSError:
            pass
    return vals


def run_measured(argv: list[str]) -> dict:
    """Run a command; sample its process tree's memory every 0.1 s."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"anon_sum": 0, "hwm_max": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            stats = [_status(p) for p in _tree(proc.pid)]
            peak["anon_sum"] = max(peak["anon_sum"], sum(s.get("Pss_Anon", 0) for s in stats))
            peak["hwm_max"] = max([peak["hwm_max"]] + [s.get("VmHWM", 0) for s in stats])
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    output, _ = proc.communicate()
    done.set()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{output}")
    return dict(
        seconds=time.perf_counter() - t0,
        peak_anon_bytes=peak["anon_sum"],
        peak_rss_bytes=peak["hwm_max"],
        output=output.strip().splitlines()[-3:],
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="tinyllama-1.1b")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--workdir", default=None, help="Scratch directory (needs ~3x the model).")
    p.add_argument("--keep", action="store_true", help="Keep the scratch files.")
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    hf_cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", **MODELS[args.model])
    work = args.workdir or os.path.join(os.path.dirname(__file__), "results", "convert-scratch")
    src, ckpt, back = (os.path.join(work, n) for n in ("hf-source", "megapatch", "hf-export"))
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    cli = [sys.executable, "-m", "megapatch.cli", "convert"]

    t0 = time.perf_counter()
    digests = write_random_hf(src, hf_cfg, dtype)
    gen_s = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    print(
        f"{args.model}: wrote random {args.dtype} checkpoint, {size / 1e9:.2f} GB in {gen_s:.0f}s"
    )

    imp = run_measured(cli + ["import", "--load", src, "--save", ckpt])
    print(f"import: {imp['seconds']:.0f}s, peak anonymous {imp['peak_anon_bytes'] / 2**30:.2f} GiB")
    shutil.rmtree(src)  # only the digests are needed from here on
    exp = run_measured(cli + ["export", "--load", ckpt, "--save", back])
    print(f"export: {exp['seconds']:.0f}s, peak anonymous {exp['peak_anon_bytes'] / 2**30:.2f} GiB")

    entries = open_hf_checkpoint(back)
    mismatched = [n for n, d in digests.items() if _digest(entries[n]) != d]
    result = dict(
        model=args.model,
        dtype=args.dtype,
        parameters=sum(torch.Size(e.shape).numel() for e in entries.values()),
        bytes=size,
        import_=imp,
        export=exp,
        round_trip_identical=not mismatched and set(entries) == set(digests),
        mismatched=mismatched[:5],
        machine=dict(cpus=os.cpu_count(), platform=platform.platform()),
    )
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    out = os.path.join(os.path.dirname(__file__), "results", f"convert-{args.model}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["round_trip_identical"] else 1


def _digest(entry) -> str:  # noqa: ANN001
    t = read_tensor(entry)
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
