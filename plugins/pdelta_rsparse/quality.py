"""`pdelta rsparse quality`: next-token accuracy and perplexity of R-Sparse variants vs the dense model.

Every variant is scored with every token sparse (`mode="sparse"`, the protocol of the paper's and
TEAL's accuracy tables; real decoding keeps the prompt dense, so it can only do better), on
held-out text cut into windows of `seq_len` tokens:

* dense: the model as it is;
* R-Sparse, search: per-layer ρ from the layerwise search (what `pdelta rsparse apply` writes);
* R-Sparse, uniform ρ: one ρ for every layer; "best" takes the grid value with the least mean
  calibration error over the layers (the strongest single ρ the search's own data can name);
* sparse only, |x| (TEAL-style): ρ = 1, channels scored by |x_j| alone;
* sparse only, |x|·‖W_j‖: ρ = 1 with R-Sparse's weighted score (separates the score from the low-rank part).

>>> print(quality_report("tiny-llama", Path("heldout.txt"), sparsities=[0.5])["text"])   # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch

from .calibration import calibrate, calibration_tokens, read_text
from .modules import set_mode, sparsify
from .search import RHO_GRID


@torch.no_grad()
def score_lm(model, windows: torch.Tensor, batch_size: int = 16) -> tuple[float, float]:
    """(next-token accuracy, perplexity) over `windows` (B×L ids; position 0 is never a target)."""
    nll = correct = count = 0.0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        target = ids[:, 1:]
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                       reduction="sum"))
        correct += float((logits.argmax(-1) == target).sum())
        count += target.numel()
    return correct / count, math.exp(nll / count)


def heldout_windows(tokenizer, path: Path, *, seq_len: int, max_tokens: int) -> torch.Tensor:
    text, _ = read_text(path)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    rows = len(ids) // (seq_len - 1)
    if rows == 0:
        raise ValueError(f"{path}: fewer than {seq_len} tokens")
    body = torch.tensor(ids[:rows * (seq_len - 1)]).view(rows, seq_len - 1)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else body[0, 0].item()
    return torch.cat([torch.full((rows, 1), bos), body], dim=1)


def quality_report(model_path: str | Path, text: Path, *, calibration: Path | None = None,
                   sparsities: list[float] = (0.4, 0.5, 0.7), rho: str = "best", max_tokens: int = 16384,
                   seq_len: int = 128, samples: int = 16) -> dict[str, Any]:
    """Rows of (variant, sparsity, accuracy, perplexity, mean calibration error) and a printable table."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .transform import RSparseOptions, layer_names

    tok = AutoTokenizer.from_pretrained(model_path)
    dense = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    layers = layer_names(dense.config.to_dict(), RSparseOptions().targets)
    calib, calib_note = calibration_tokens(tok, calibration, samples=samples, seq_len=seq_len)
    windows = heldout_windows(tok, text, seq_len=seq_len, max_tokens=max_tokens)
    acc0, ppl0 = score_lm(dense, windows)
    rows = [{"variant": "dense", "sparsity": 0.0, "acc": acc0, "ppl": ppl0, "calib_err": 0.0, "rho": None}]

    def run(name: str, s: float, *, search: str, r: float = 1.0, score: str = "weighted") -> dict[str, Any]:
        found = calibrate(dense, calib, layers, sparsity=s, search=search, rho=r, score=score)
        model = set_mode(sparsify(copy.deepcopy(dense), found, score=score), "sparse")
        acc, ppl = score_lm(model, windows)
        rhos = [x.rho for x in found.values()]
        row = {"variant": name, "sparsity": s, "acc": acc, "ppl": ppl, "rho": sum(rhos) / len(rhos),
               "calib_err": sum(x.rel_err for x in found.values()) / len(found)}
        rows.append(row)
        return row

    for s in sparsities:
        errors: dict[str, dict[float, float]] = {}
        calibrate(dense, calib, layers, sparsity=s, search="layerwise", errors=errors)
        per_rho = {r: sum(e[r] for e in errors.values()) / len(errors) for r in RHO_GRID}
        uniform = min(per_rho, key=per_rho.get) if rho == "best" else float(rho)
        run("R-Sparse, search", s, search="layerwise")
        run(f"R-Sparse, uniform ρ={uniform:g}", s, search="none", r=uniform)
        run("sparse only, |x| (TEAL)", s, search="none", r=1.0, score="abs")
        run("sparse only, |x|·‖W_j‖", s, search="none", r=1.0)
    lines = [f"Quality of {model_path} on {windows.numel()} held-out tokens of {text} ({windows.shape[0]} windows of "
             f"{seq_len}); every token sparse; calibration: {calib_note}",
             f"{'variant':<30}{'s':>5}{'mean ρ':>8}{'calib err':>11}{'next-token acc':>16}{'Δ pts':>8}"
             f"{'ppl':>9}{'Δ ppl':>9}"]
    for r in rows:
        rho_txt = "" if r["rho"] is None else f"{r['rho']:.2f}"
        lines.append(f"{r['variant']:<30}{r['sparsity']:>5.2f}{rho_txt:>8}{r['calib_err']:>11.4f}"
                     f"{100 * r['acc']:>15.2f}%{100 * (r['acc'] - acc0):>+8.2f}{r['ppl']:>9.3f}"
                     f"{100 * (r['ppl'] / ppl0 - 1):>+8.1f}%")
    return {"rows": rows, "dense": {"acc": acc0, "ppl": ppl0}, "text": "\n".join(lines)}
