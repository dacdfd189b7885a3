"""`pdelta demo`: ParamΔ end to end on tiny checkpoints made on the spot, with no download.

It builds a small Llama "base", a "post" model and a "new base" (seeded perturbations of
the base), applies ParamΔ, checks every output element against an fp64 reference and that
transformers loads and runs the result. The toy world (trained models, lm-eval scores)
replaces these random weights once it lands.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def build_tiny_triple(root: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """Three sharded bf16 Llama checkpoints: base, post = base + δ₁, new base = base + δ₂."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging

    logging.disable_progress_bar()
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = []
    for i, name in enumerate(("base", "post", "new_base")):
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for k, v in model.state_dict().items():
                noise = torch.randn(v.shape, generator=g) * 0.02 * float(state[k].float().std() or 1.0)
                v.copy_(state[k].float() + noise * (i > 0))
        model.save_pretrained(root / name, max_shard_size="100KB")
        paths.append(root / name)
    return paths[1], paths[0], paths[2]


def run_demo(out: Path | None = None, progress: bool = True) -> dict:
    """Build the tiny triple, apply ParamΔ, check it exactly, load it; returns a summary."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from .delta import apply

    with tempfile.TemporaryDirectory(prefix="pdelta-demo-") as tmp:
        root = Path(tmp)
        post, base, new_base = build_tiny_triple(root)
        target = out or root / "merged"
        start = time.perf_counter()
        report = apply(target, post=post, base=base, new_base=new_base, max_shard_size="200KB",
                       overwrite=out is not None, progress=progress)

        def load(folder: Path) -> dict:
            state: dict = {}
            for f in sorted(folder.glob("*.safetensors")):
                state.update(load_file(f))
            return state

        p, b, n, o = (load(x) for x in (post, base, new_base, target))
        mismatched = sum(int((o[k] != (n[k].double() + p[k].double() - b[k].double()).to(o[k].dtype)).sum())
                         for k in o)
        model = AutoModelForCausalLM.from_pretrained(target)
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
        return {"out": str(target) if out else "(temporary)", "tensors": report.tensors,
                "elements": sum(v.numel() for v in o.values()), "mismatched_elements": mismatched,
                "loads_in_transformers": bool(torch.isfinite(logits).all()),
                "seconds": round(time.perf_counter() - start, 2), "formula": report.formula}
