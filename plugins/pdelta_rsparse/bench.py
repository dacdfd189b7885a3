"""`pdelta rsparse bench`: batch-1 decode speed of R-Sparse vs dense fp32, all measured in one run.

Two parts, each variant timed in interleaved rounds (dense, then each R-Sparse variant, again and
again) so that load from other processes on the shared cores hits them alike; medians reported.

* Layers shaped like Llama-7B's (4096→4096, 4096→11008, 11008→4096; W is out×in): one decode
  token through `RSparseLinear` (mask, kernel, low-rank part, all included) vs `nn.Linear`. Enough
  copies of each weight are cycled that they never sit in the CPU cache, as in a real model.
  ρ = 1 spends the whole budget on kept channels (one embedding_bag); ρ = 0.5 splits it with a
  low-rank part (two more GEMVs). Random weights, so only the timing means anything here.
* A synthetic ~100M-parameter Llama (random weights; thresholds calibrated on random tokens):
  end-to-end greedy decode tokens/s with a KV cache, after a 16-token prompt, vs the dense model.

The memory-traffic limit of a layer is 1/(1 − s): the share of weight bytes it still reads.

>>> print(run_bench([0.5], repeats=5, rounds=1, model=False)["text"])   # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import statistics
import time
from typing import Any

import torch
from torch import nn

from .modules import RSparseLinear
from .search import budget, threshold

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (out m, in n): q/k/v/o, gate/up, down
RHOS = (1.0, 0.5, 0.2)
CACHE_BUSTING_BYTES = 256 << 20  # weight bytes cycled per shape, well above the 32 MiB L3 here
MODEL_CONFIG = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                    num_key_value_heads=12, vocab_size=8000, max_position_embeddings=512)


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _dense_layers(m: int, n: int, copies: int, gen: torch.Generator) -> list[tuple[nn.Linear, torch.Tensor]]:
    """`copies` random nn.Linear (out m, in n) with their Wᵀ (shared by every R-Sparse twin)."""
    out = []
    for _ in range(copies):
        lin = nn.Linear(n, m, bias=False).requires_grad_(False)
        lin.weight.normal_(0, n ** -0.5, generator=gen)
        out.append((lin, lin.weight.t().contiguous()))
    return out


def _twins(dense: list[tuple[nn.Linear, torch.Tensor]], sparsity: float, rho: float, calib: torch.Tensor,
           gen: torch.Generator) -> list[RSparseLinear]:
    """R-Sparse layers with the right shapes and τ fit on random inputs. Random factors stand in for
    the SVD, which would take minutes at these sizes and changes no timing."""
    twins = []
    for lin, wt in dense:
        m, n = lin.weight.shape
        keep, rank = budget(m, n, sparsity=sparsity, rho=rho)
        col_norm = lin.weight.norm(dim=0)
        tau = threshold(calib.abs() * col_norm, keep)
        lr_u = torch.randn(m, rank, generator=gen) * m ** -0.5 if rank else None
        lr_v = torch.randn(rank, n, generator=gen) * n ** -0.5 if rank else None
        twins.append(RSparseLinear(wt, col_norm, tau, lr_u, lr_v, None, "auto"))
    return twins


class _Transposed:
    """Dense x @ Wᵀ from the stored (n×m) layout: the other way to run the dense GEMV."""

    def __init__(self, wt: torch.Tensor):
        self.wt = wt

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.wt)


@torch.no_grad()
def bench_layers(sparsities: list[float], *, repeats: int, rounds: int, seed: int = 0) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for m, n in SHAPES:
        copies = max(2, CACHE_BUSTING_BYTES // (m * n * 4))
        xs = [torch.randn(1, 1, n, generator=gen) for _ in range(16)]
        calib = torch.randn(256, n, generator=gen)
        dense = _dense_layers(m, n, copies, gen)
        for s in sparsities:
            variants: dict[str, list[Any]] = {"dense": [lin for lin, _ in dense],
                                              "dense_t": [_Transposed(wt) for _, wt in dense]}
            variants.update({f"rho={rho:g}": _twins(dense, s, rho, calib, gen) for rho in RHOS})
            times: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(rounds):
                for name, mods in variants.items():
                    for i in range(repeats + 1):
                        x, mod = xs[i % len(xs)], mods[i % len(mods)]
                        t = time.perf_counter()
                        mod(x)
                        if i:  # the first call of a round warms up
                            times[name].append(time.perf_counter() - t)
            d = min(_median_ms(times["dense"]), _median_ms(times["dense_t"]))  # the faster dense layout
            row = {"shape": f"{n}→{m}", "sparsity": s, "dense_ms": d, "limit": 1 / (1 - s),
                   "nn_linear_ms": _median_ms(times["dense"]), "x_wt_ms": _median_ms(times["dense_t"])}
            for rho in RHOS:
                ms = _median_ms(times[f"rho={rho:g}"])
                row[f"rho{rho:g}_ms"], row[f"rho{rho:g}_speedup"] = ms, d / ms
            rows.append(row)
            _progress(f"{n}→{m} s={s:g}: " + ", ".join(f"{k} {_median_ms(v):.2f} ms" for k, v in times.items()))
            del variants
    return rows


def synthetic_model(seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**MODEL_CONFIG)).eval()


@torch.no_grad()
def _decode_seconds(model, prompt: torch.Tensor, tokens: int) -> float:
    """Seconds for `tokens` greedy decode steps after a prefill of `prompt` (prefill not timed)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x renamed it
    nxt = model(input_ids=prompt, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(tokens):  # the cache object grows in place
        nxt = model(input_ids=nxt, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


@torch.no_grad()
def _sparse_twin(dense, layers: list[str], calib: torch.Tensor, sparsity: float, rho: float, gen: torch.Generator):
    """A copy of `dense` whose targeted linears are R-Sparse with τ fit on `calib` (dense activations)
    and random factors of the planned rank in place of the SVD (same timing, no minutes of SVDs)."""
    import copy

    seen: dict[str, torch.Tensor] = {}
    hooks = [dense.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]))) for n in layers]
    dense(input_ids=calib, use_cache=False)
    for h in hooks:
        h.remove()
    twin = copy.deepcopy(dense)
    for name in layers:
        lin = dense.get_submodule(name)
        parent, _, child = name.rpartition(".")
        [mod] = _twins([(lin, lin.weight.t().contiguous())], sparsity, rho, seen[name], gen)
        setattr(twin.get_submodule(parent), child, mod)
    return twin


@torch.no_grad()
def bench_model(sparsities: list[float], *, tokens: int, rounds: int, seed: int = 0) -> list[dict[str, Any]]:
    from .transform import RSparseOptions, layer_names

    gen = torch.Generator().manual_seed(seed)
    dense = synthetic_model(seed)
    params = sum(p.numel() for p in dense.parameters())
    layers = layer_names(dense.config.to_dict(), RSparseOptions().targets)
    calib = torch.randint(0, MODEL_CONFIG["vocab_size"], (4, 64), generator=gen)
    prompt = torch.randint(0, MODEL_CONFIG["vocab_size"], (1, 16), generator=gen)
    rows = []
    for s in sparsities:
        variants = {"dense": dense}
        variants.update({f"rho={rho:g}": _sparse_twin(dense, layers, calib, s, rho, gen) for rho in RHOS})
        rates: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for name, model in variants.items():
                rates[name].append(tokens / _decode_seconds(model, prompt, tokens))
        d = statistics.median(rates["dense"])
        row = {"model": f"Llama {params / 1e6:.0f}M", "sparsity": s, "dense_tok_s": d}
        for rho in RHOS:
            r = statistics.median(rates[f"rho={rho:g}"])
            row[f"rho{rho:g}_tok_s"], row[f"rho{rho:g}_speedup"] = r, r / d
        targeted = sum(dense.get_submodule(n).weight.numel() for n in layers)
        row["limit"] = 1 / (1 - s * targeted / params)  # the untouched embedding, lm_head, norms still read
        rows.append(row)
        _progress(f"model s={s:g}: " + ", ".join(f"{k} {statistics.median(v):.1f} tok/s" for k, v in rates.items()))
    return rows


def _progress(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def run_bench(sparsities: list[float], *, repeats: int = 15, rounds: int = 3, tokens: int = 24,
              layers: bool = True, model: bool = True, threads: int = 0) -> dict[str, Any]:
    """Both parts; returns rows and a printable table in "text"."""
    if threads:
        torch.set_num_threads(threads)
    lines = [f"R-Sparse decode bench: fp32, batch 1, torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"medians over interleaved rounds; speedup = dense time / R-Sparse time, where dense is the faster of "
             f"nn.Linear (W x) and x @ Wᵀ"]
    result: dict[str, Any] = {"threads": torch.get_num_threads()}
    if layers:
        rows = bench_layers(sparsities, repeats=repeats, rounds=rounds)
        result["layers"] = rows
        lines += ["", "Llama-7B-shaped linears (in→out), one decode token; ms and speedup per ρ:",
                  f"{'shape':<12}{'s':>5}{'dense ms':>10}" + "".join(f"{f'ρ={r:g} ms':>10}{'×':>7}" for r in RHOS)
                  + f"{'limit':>8}"]
        lines += [f"{r['shape']:<12}{r['sparsity']:>5.2f}{r['dense_ms']:>10.2f}"
                  + "".join(f"{r[f'rho{p:g}_ms']:>10.2f}{r[f'rho{p:g}_speedup']:>6.2f}×" for p in RHOS)
                  + f"{r['limit']:>7.2f}×" for r in rows]
        for s in sparsities:
            dense_ms = sum(r["dense_ms"] for r in rows if r["sparsity"] == s)
            both = ", ".join(f"ρ={p:g} {dense_ms / sum(r[f'rho{p:g}_ms'] for r in rows if r['sparsity'] == s):.2f}×"
                             for p in RHOS)
            lines.append(f"  all three shapes (one Llama-7B MLP + one projection) at s={s:g}: {both} "
                         f"(limit {1 / (1 - s):.2f}×)")
    if model:
        rows = bench_model(sparsities, tokens=tokens, rounds=rounds)
        result["model"] = rows
        lines += ["", f"End-to-end greedy decode, {tokens} tokens after a 16-token prompt (KV cache); tok/s, speedup:",
                  f"{'model':<13}{'s':>5}{'dense':>8}" + "".join(f"{f'ρ={r:g}':>9}{'×':>7}" for r in RHOS)
                  + f"{'limit':>8}"]
        lines += [f"{r['model']:<13}{r['sparsity']:>5.2f}{r['dense_tok_s']:>8.1f}"
                  + "".join(f"{r[f'rho{p:g}_tok_s']:>9.1f}{r[f'rho{p:g}_speedup']:>6.2f}×" for p in RHOS)
                  + f"{r['limit']:>7.2f}×" for r in rows]
        lines.append("  limit: 1/(1 − s·share of parameters in targeted linears); embeddings, lm_head stay dense")
    result["text"] = "\n".join(lines)
    return result
