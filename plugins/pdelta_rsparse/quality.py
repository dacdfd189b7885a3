"""`pdelta rsparse quality`: next-token accuracy, perplexity and KL to dense of R-Sparse variants.

Every variant is scored with every token sparse (`mode="sparse"`, the protocol of the paper's and
TEAL's accuracy tables; real decoding keeps the prompt dense, so it can only do better), on
held-out documents (each tokenised as training does, cut into windows of `seq_len` from its start):

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

from .calibration import calibrate, calibration_tokens, document_ids, read_documents
from .modules import set_mode, sparsify
from .search import RHO_GRID


@torch.no_grad()
def score_lm(model, windows: torch.Tensor, mask: torch.Tensor | None = None, *, batch_size: int = 16,
             reference: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Next-token `acc`, `ppl` and, given the dense model's `logprobs` as `reference`, `kl` = mean KL(dense ‖ model).

    Targets are positions 1.. where `mask` is 1. Windows are right-padded, so under the causal
    mask padding never reaches a scored position. KL is the direct measure of how far the sparse
    model moved from the dense one; perplexity can improve when a perturbation merely flattens an
    overconfident model's distribution (the toy world's ParamΔ model is one: README).
    """
    mask = torch.ones_like(windows) if mask is None else mask
    nll = correct = count = kl = 0.0
    logprobs = []
    for i, start in enumerate(range(0, windows.shape[0], batch_size)):
        ids, keep = windows[start:start + batch_size], mask[start:start + batch_size, 1:].bool()
        logp = model(input_ids=ids, use_cache=False).logits[:, :-1].float()[keep].log_softmax(-1)
        target = ids[:, 1:][keep]
        nll -= float(logp.gather(1, target[:, None]).sum())
        correct += float((logp.argmax(-1) == target).sum())
        count += target.numel()
        if reference is not None:
            kl += float((reference[i].exp() * (reference[i] - logp)).sum())
        else:
            logprobs.append(logp)
    return {"acc": correct / count, "ppl": math.exp(nll / count), "kl": kl / count if reference is not None else None,
            "logprobs": logprobs}


def heldout_windows(tokenizer, path: Path, *, seq_len: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): each document tokenised as training does, cut into windows of `seq_len` from its start.

    Documents are scored one by one, as `paramdelta.train` trains them (one document per example,
    ended by eos), so no window starts mid-document or holds a token training never showed.
    The first token of a window is context only. Stops after `max_tokens` tokens.
    """
    docs, source = read_documents(path)
    rows, total = [], 0
    for doc in docs:
        ids = document_ids(tokenizer, doc)
        for i in range(0, len(ids), seq_len):
            if len(ids[i:i + seq_len]) > 1 and total < max_tokens:
                rows.append(ids[i:i + seq_len])
                total += len(rows[-1])
    if not rows:
        raise ValueError(f"{source}: no document has 2 tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def quality_report(model_path: str | Path, text: Path, *, calibration: Path | None = None,
                   sparsities: list[float] = (0.4, 0.5, 0.7), rho: str = "best", max_tokens: int = 16384,
                   seq_len: int = 128, samples: int = 16) -> dict[str, Any]:
    """Rows of (variant, sparsity, accuracy, perplexity, KL to dense, mean calibration error) and a printable table."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .transform import RSparseOptions, layer_names

    tok = AutoTokenizer.from_pretrained(model_path)
    dense = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    layers = layer_names(dense.config.to_dict(), RSparseOptions().targets)
    calib, calib_note = calibration_tokens(tok, calibration, samples=samples, seq_len=seq_len)
    windows, mask = heldout_windows(tok, text, seq_len=seq_len, max_tokens=max_tokens)
    base = score_lm(dense, windows, mask)
    acc0, ppl0 = base["acc"], base["ppl"]
    rows = [{"variant": "dense", "kind": "dense", "sparsity": 0.0, "acc": acc0, "ppl": ppl0, "kl": 0.0,
             "calib_err": 0.0, "rho": None}]

    def run(kind: str, name: str, s: float, *, search: str, r: float = 1.0, score: str = "weighted") -> dict[str, Any]:
        found = calibrate(dense, calib, layers, sparsity=s, search=search, rho=r, score=score)
        model = set_mode(sparsify(copy.deepcopy(dense), found, score=score), "sparse")
        got = score_lm(model, windows, mask, reference=base["logprobs"])
        rhos = [x.rho for x in found.values()]
        row = {"variant": name, "kind": kind, "sparsity": s, "acc": got["acc"], "ppl": got["ppl"], "kl": got["kl"],
               "rho": sum(rhos) / len(rhos) if search == "layerwise" else r,
               "calib_err": sum(x.rel_err for x in found.values()) / len(found)}
        rows.append(row)
        return row

    for s in sparsities:
        errors: dict[str, dict[float, float]] = {}
        calibrate(dense, calib, layers, sparsity=s, search="layerwise", errors=errors)
        per_rho = {r: sum(e[r] for e in errors.values()) / len(errors) for r in RHO_GRID}
        uniform = min(per_rho, key=per_rho.get) if rho == "best" else float(rho)
        run("search", "R-Sparse, search", s, search="layerwise")
        run("uniform", f"R-Sparse, uniform ρ={uniform:g}", s, search="none", r=uniform)
        run("teal", "sparse only, |x| (TEAL)", s, search="none", r=1.0, score="abs")
        run("weighted-sparse", "sparse only, |x|·‖W_j‖", s, search="none", r=1.0)
    lines = [f"Quality of {model_path} on {int(mask[:, 1:].sum())} held-out next-token targets of {text} "
             f"({windows.shape[0]} documents/windows of ≤ {seq_len}); every token sparse; calibration: {calib_note}",
             f"{'variant':<30}{'s':>5}{'mean ρ':>8}{'calib err':>11}{'next-token acc':>16}{'Δ pts':>8}"
             f"{'ppl':>9}{'Δ ppl':>9}{'KL to dense':>13}"]
    for r in rows:
        rho_txt = "" if r["rho"] is None else f"{r['rho']:.2f}"
        lines.append(f"{r['variant']:<30}{r['sparsity']:>5.2f}{rho_txt:>8}{r['calib_err']:>11.4f}"
                     f"{100 * r['acc']:>15.2f}%{100 * (r['acc'] - acc0):>+8.2f}{r['ppl']:>9.3f}"
                     f"{100 * (r['ppl'] / ppl0 - 1):>+8.1f}%{r['kl']:>13.4f}")
    return {"rows": rows, "dense": {"acc": acc0, "ppl": ppl0}, "text": "\n".join(lines)}
