"""The run directory: the fully resolved config, the git commit and the plan beside the run."""

from __future__ import annotations

import json
import os
import subprocess

from megapatch.config import RunConfig, to_yaml
from megapatch.training.plan import StagePlan


def git_commit() -> str | None:
    """The commit of the megapatch checkout (with '-dirty' for local changes), if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def prepare_run_dir(cfg: RunConfig, plan: list[StagePlan], world_size: int) -> dict:
    """Create RUN_DIR, write config.yaml, git_commit.txt and plan.json; return run metadata.

    A config.yaml already there with other content (a resumed run whose flags changed) is kept
    as config.yaml.1, .2, ... rather than overwritten.
    """
    os.makedirs(cfg.run_dir, exist_ok=True)
    text = to_yaml(cfg)
    path = os.path.join(cfg.run_dir, "config.yaml")
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old != text:
            n = 1
            while os.path.exists(f"{path}.{n}"):
                n += 1
            os.replace(path, f"{path}.{n}")
    with open(path, "w") as f:
        f.write(text)
    commit = git_commit()
    with open(os.path.join(cfg.run_dir, "git_commit.txt"), "w") as f:
        f.write((commit or "unknown (not a git checkout)") + "\n")
    with open(os.path.join(cfg.run_dir, "plan.json"), "w") as f:
        json.dump(dict(world_size=world_size, stages=[s.as_dict() for s in plan]), f, indent=2)
    tokenizer, add_bos = None, False
    if cfg.data.data_path:
        from megapatch.data.stream import parse_blend, read_meta

        meta = next((m for m in read_meta(parse_blend(cfg.data.data_path)[0]) if m), {})
        tokenizer = meta.get("tokenizer_model")
        tokenizer = os.path.abspath(tokenizer) if tokenizer else None
        add_bos = meta.get("bos_id") is not None
    return dict(git_commit=commit, tokenizer_model=tokenizer, add_bos_token=add_bos)
