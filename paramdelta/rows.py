"""Row-aligned ParamΔ for embedding and lm_head tensors whose vocabularies differ (see vocab.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .plan import Job, Plan


def mean_row(t: torch.Tensor, dtype: torch.dtype, chunk_rows: int) -> torch.Tensor:
    """Mean over rows, accumulated in fp64 chunk by chunk (no full-size copy)."""
    import torch

    acc = torch.zeros(t.shape[1], dtype=torch.float64)
    for r in range(0, t.shape[0], chunk_rows):
        acc += t[r:r + chunk_rows].to(torch.float64).sum(0)
    return (acc / max(t.shape[0], 1)).to(dtype)


def compute_vocab_rows(plan: Plan, job: Job, math_dtype: torch.dtype, chunk_elements: int) -> Iterator[torch.Tensor]:
    """Yield the output tensor in row blocks, each row taken from its aligned source rows."""
    import torch

    rm = job.rows
    assert rm is not None
    nb = plan.new_base.read(job.out.name)
    cols = nb.shape[1]
    step = max(1, chunk_elements // cols)
    terms = []
    for term, src in zip(plan.terms, job.sources):
        terms.append((term.alpha, term.post.read(src[1]), term.base.read(src[2]),
                      torch.tensor(rm.posts[len(terms)]), torch.tensor(rm.bases[len(terms)])))
    nb_idx = torch.tensor(rm.new_base)
    nb_mean = mean_row(nb, math_dtype, step) if (nb_idx < 0).any() else None
    base_means: dict[int, torch.Tensor] = {}
    for r0 in range(0, rm.rows, step):
        r1 = min(r0 + step, rm.rows)
        acc = torch.zeros(r1 - r0, cols, dtype=math_dtype)
        sel = nb_idx[r0:r1]
        have = sel >= 0
        if have.any():
            acc[have] = nb[sel[have]].to(math_dtype)
        for alpha, post, base, pi, bi in terms:
            p, b = pi[r0:r1], bi[r0:r1]
            ok = have & (p >= 0) & (b >= 0)
            if ok.any():
                delta = post[p[ok]].to(math_dtype)
                delta.sub_(base[b[ok]].to(math_dtype))
                acc[ok] = acc[ok].add_(delta, alpha=alpha)
        for j in (~have).nonzero().flatten().tolist():
            acc[j] = nb_mean
            holders = [(k, t) for k, t in enumerate(terms) if int(t[3][r0 + j]) >= 0]
            if rm.policy == "copy-post" and holders:
                _, (_, post, _, pi, _) = holders[0]
                acc[j] = post[int(pi[r0 + j])].to(math_dtype)
            elif rm.policy == "mean":
                for k, (alpha, post, base, pi, _) in holders:
                    if k not in base_means:
                        base_means[k] = mean_row(base, math_dtype, step)
                    acc[j] += alpha * (post[int(pi[r0 + j])].to(math_dtype) - base_means[k])
        yield acc
