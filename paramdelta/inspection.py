"""Look inside checkpoints without loading them: a header-only summary, and ParamΔ diagnostics.

ParamΔ works because the post-training delta (post − base) and the base-update delta
(new base − base) are small next to the base weights and nearly orthogonal (DESIGN.md §2).
`compare` measures exactly that, per tensor, per tensor group (the name without its layer
index) and per layer, streaming ~1M-element chunks with fp64 sums, so memory stays bounded
and every aggregate is a ratio of sums rather than an average of ratios.

>>> inspect_checkpoint("path/to/model")["parameters"]                     # doctest: +SKIP
1235814400
>>> compare("inst", "base", "base-v2")["groups"][0]["cos"]                # doctest: +SKIP
0.021
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .errors import OptionError
from .plan import embedding_name, resolve_name
from .progress import progress_bar
from .provenance import read_provenance

CHUNK_ELEMENTS = 1 << 20
ARCH_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads")
METRICS = ("post_rel", "update_rel", "cos", "sign_agreement")
METRIC_LABELS = {"post_rel": "‖Δpost‖/‖Θbase‖", "update_rel": "‖Δupdate‖/‖Θbase‖",
                 "cos": "cos(Δpost, Δupdate)", "sign_agreement": "sign agreement"}
_LAYER = re.compile(r"\.(\d+)\.")
_SUMS = ("base_sq", "post_sq", "update_sq", "dot", "sign_agree", "sign_both", "numel")

CkptLike = str | os.PathLike | Checkpoint


def _open(ref: CkptLike) -> Checkpoint:
    return ref if isinstance(ref, Checkpoint) else Checkpoint.open(ref)


# -- summary ------------------------------------------------------------------------------------
def inspect_checkpoint(path: CkptLike) -> dict[str, Any]:
    """What a checkpoint holds, from its headers and side files only (no weight byte is read).

    >>> s = inspect_checkpoint("org-base")                                      # doctest: +SKIP
    >>> s["parameters"], s["shards"], s["tie_word_embeddings"], s["dtypes"]     # doctest: +SKIP
    (1235814400, 4, False, {'BF16': {'tensors': 146, 'parameters': 1235814400}})
    """
    ckpt = _open(path)
    cfg = ckpt.config
    text_cfg = cfg.get("text_config") or {}
    dtypes: dict[str, dict[str, int]] = {}
    for t in ckpt.tensors.values():
        d = dtypes.setdefault(t.dtype, {"tensors": 0, "parameters": 0})
        d["tensors"] += 1
        d["parameters"] += t.numel
    emb = embedding_name(ckpt)
    head = ckpt.tensors.get("lm_head.weight")
    vocab = ckpt.vocab
    return {
        "path": str(ckpt.path),
        "parameters": ckpt.num_parameters,
        "bytes": ckpt.nbytes,
        "tensors": len(ckpt.tensors),
        "dtypes": dtypes,
        "shards": len(ckpt.shards),
        "files": [f.name for f in ckpt.files],
        "tie_word_embeddings": ckpt.tie_word_embeddings,
        "lm_head_stored": head is not None,
        "vocab": {"config": cfg.get("vocab_size", text_cfg.get("vocab_size")),
                  "embedding_rows": ckpt.tensors[emb].shape[0] if emb else None,
                  "lm_head_rows": head.shape[0] if head is not None else None,
                  "tokenizer": len(vocab) if vocab is not None else None},
        "architecture": {k: cfg.get(k, text_cfg.get(k)) for k in ARCH_KEYS},
        "provenance": read_provenance(ckpt) or None,
    }


# -- ParamΔ diagnostics -------------------------------------------------------------------------
def group_of(name: str) -> tuple[str, int | None]:
    """A tensor's group (its name without the layer index) and its layer index.

    >>> group_of("model.layers.3.self_attn.q_proj.weight")
    ('self_attn.q_proj.weight', 3)
    >>> group_of("model.norm.weight")
    ('norm.weight', None)
    """
    m = _LAYER.search(name)
    if m is None:
        return name.removeprefix("model."), None
    return name[m.end():], int(m.group(1))


def metrics(sums: dict[str, float]) -> dict[str, float | None]:
    """The four diagnostics from accumulated sums (None where a norm is zero)."""
    b, p, u = sums["base_sq"], sums["post_sq"], sums["update_sq"]
    return {"post_rel": math.sqrt(p / b) if b > 0 else None,
            "update_rel": math.sqrt(u / b) if b > 0 else None,
            "cos": sums["dot"] / math.sqrt(p * u) if p > 0 and u > 0 else None,
            "sign_agreement": sums["sign_agree"] / sums["sign_both"] if sums["sign_both"] else None}


def compare(post: CkptLike, base: CkptLike, new_base: CkptLike, *, progress: bool = True) -> dict[str, Any]:
    """Per tensor, group and layer: ‖Δpost‖/‖Θbase‖, ‖Δupdate‖/‖Θbase‖, cos(Δpost, Δupdate) and
    sign agreement, where Δpost = post − base and Δupdate = new_base − base.

    Tensors whose row counts differ (vocabulary growth) are compared on their common leading
    rows and flagged; tensors missing somewhere, non-float ones or other shape mismatches are
    listed under "skipped".

    >>> r = compare("inst", "base", "base-v2", progress=False)                 # doctest: +SKIP
    >>> [(g["group"], round(g["cos"], 3)) for g in r["groups"]][:2]            # doctest: +SKIP
    [('embed_tokens.weight', 0.013), ('self_attn.q_proj.weight', 0.021)]
    """
    p_ck, b_ck, n_ck = _open(post), _open(base), _open(new_base)
    work, skipped = [], []
    for name, info in b_ck.tensors.items():
        if not info.is_float:
            skipped.append({"name": name, "reason": f"not a float tensor ({info.dtype})"})
            continue
        pn, nn = resolve_name(p_ck, name), resolve_name(n_ck, name)
        if pn is None or nn is None:
            where = " and ".join(r for r, k in (("post", pn), ("new base", nn)) if k is None)
            skipped.append({"name": name, "reason": f"missing in {where}"})
            continue
        shapes = [p_ck.tensors[pn].shape, info.shape, n_ck.tensors[nn].shape]
        if len(set(shapes)) == 1:
            work.append((name, pn, nn, info.numel, None))
        elif len(info.shape) >= 1 and len({s[1:] for s in shapes}) == 1 and all(len(s) >= 1 for s in shapes):
            rows = min(s[0] for s in shapes)
            flag = (f"rows differ (post {shapes[0][0]}, base {shapes[1][0]}, new base {shapes[2][0]}); "
                    f"compared the first {rows}")
            work.append((name, pn, nn, rows * math.prod(info.shape[1:]), flag))
        else:
            skipped.append({"name": name, "reason": "shapes differ: " + ", ".join(
                f"{r} {list(s)}" for r, s in zip(("post", "base", "new base"), shapes))})
    for name, info in p_ck.tensors.items():
        if info.is_float and resolve_name(b_ck, name) is None:
            skipped.append({"name": name, "reason": "only in post"})

    tensors: list[dict[str, Any]] = []
    groups: dict[str, dict[str, Any]] = {}
    layers: dict[int, dict[str, Any]] = {}
    total = _new_agg()
    with progress_bar(sum(w[3] for w in work), "compare", unit="el", enabled=progress) as bar:
        for name, pn, nn, numel, flag in work:
            sums = _tensor_sums(p_ck.read(pn), b_ck.read(name), n_ck.read(nn), numel, bar)
            group, layer = group_of(name)
            tensors.append({"name": name, "group": group, "layer": layer, "shape": list(b_ck.tensors[name].shape),
                            "numel": numel, "flag": flag, **metrics(sums)})
            aggs = [total, groups.setdefault(group, _new_agg(group=group))]
            if layer is not None:
                aggs.append(layers.setdefault(layer, _new_agg(layer=layer)))
            for agg in aggs:
                agg["tensors"] += 1
                for k in _SUMS:
                    agg[k] += sums[k]
    return {
        "post": str(p_ck.path), "base": str(b_ck.path), "new_base": str(n_ck.path),
        "overall": _finish(total),
        "groups": [_finish(g) for g in groups.values()],
        "layers": [_finish(layers[k]) for k in sorted(layers)],
        "tensors": tensors,
        "flagged": [{"name": t["name"], "reason": t["flag"]} for t in tensors if t["flag"]],
        "skipped": skipped,
    }


def _new_agg(**label: Any) -> dict[str, Any]:
    return {**label, "tensors": 0, **dict.fromkeys(_SUMS, 0.0)}


def _finish(agg: dict[str, Any]) -> dict[str, Any]:
    """Aggregate sums -> metrics; keeps the label, tensor count and element count."""
    out = {k: v for k, v in agg.items() if k not in _SUMS}
    out["numel"] = int(agg["numel"])
    return {**out, **metrics(agg)}


def _tensor_sums(post, base, new_base, numel: int, bar) -> dict[str, float]:
    """fp64 sums over the first `numel` flattened elements, chunk by chunk (no full-size copy)."""
    import torch

    p, b, n = (t.reshape(-1) for t in (post, base, new_base))
    sums = dict.fromkeys(_SUMS, 0.0)
    for s in range(0, numel, CHUNK_ELEMENTS):
        e = min(s + CHUNK_ELEMENTS, numel)
        bc = b[s:e].to(torch.float64)
        dp = p[s:e].to(torch.float64, copy=True).sub_(bc)  # copy: an fp64 input is a read-only map
        du = n[s:e].to(torch.float64, copy=True).sub_(bc)
        sign = torch.sign(dp).mul_(torch.sign(du))
        sums["base_sq"] += float(torch.dot(bc, bc))
        sums["post_sq"] += float(torch.dot(dp, dp))
        sums["update_sq"] += float(torch.dot(du, du))
        sums["dot"] += float(torch.dot(dp, du))
        sums["sign_agree"] += int((sign > 0).sum())
        sums["sign_both"] += int((sign != 0).sum())
        sums["numel"] += e - s
        bar.update(e - s)
    return sums


# -- plot ---------------------------------------------------------------------------------------
def plot_comparison(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Draw the four diagnostics per group (top row) and per layer (bottom row) into a PNG.

    >>> plot_comparison(compare("inst", "base", "base-v2"), "delta.png")       # doctest: +SKIP
    PosixPath('delta.png')
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise OptionError("--plot needs matplotlib", hint="pip install 'paramdelta[plot]'") from None

    groups, layers = result["groups"], result["layers"]
    fig = Figure(figsize=(18, 3.5 + 0.28 * max(len(groups), 4)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4, height_ratios=[max(len(groups), 4), 6])
    for col, key in enumerate(METRICS):
        ax = axes[0][col]
        vals = [g[key] if g[key] is not None else math.nan for g in groups]
        ax.barh(range(len(groups)), vals, color="tab:blue")
        ax.set_yticks(range(len(groups)), [g["group"] for g in groups] if col == 0 else [""] * len(groups),
                      fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{METRIC_LABELS[key]} per group", fontsize=10)
        ax = axes[1][col]
        ax.bar([lay["layer"] for lay in layers],
               [lay[key] if lay[key] is not None else math.nan for lay in layers], color="tab:orange")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{METRIC_LABELS[key]} per layer", fontsize=10)
        if key == "cos":
            axes[0][col].axvline(0, color="grey", lw=0.5)
            axes[1][col].axhline(0, color="grey", lw=0.5)
    fig.suptitle(f"ParamΔ diagnostics: post {Path(result['post']).name}, base {Path(result['base']).name}, "
                 f"new base {Path(result['new_base']).name}")
    out = Path(path)
    fig.savefig(out, format="png", dpi=100)
    return out

