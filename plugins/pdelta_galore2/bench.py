"""`pdelta galore2 bench`: GaLore 2 against AdamW on one Llama and one token stream, in one run.

Each optimizer trains a fresh copy of the same seeded Llama (default hidden 512, 8 layers, MLP 1408,
vocab 32000, untied: 58M parameters) on the same batches, in its own spawned process so the peak
resident memory (ru_maxrss) of each is its own. The data is a seeded Markov chain over 1024 of the
vocabulary's ids (each has 4 likely successors), so the loss has something to learn in 100 steps. Reported:

* optimizer-state bytes, in total and for the projected matrices alone (moments + projector + step);
* peak RSS of each process; mean wall time per step (forward, backward, optimizer step; subspace
  refreshes included) and of `opt.step()` alone; how many refreshes happened;
* on the GaLore run's final gradients: randomized vs exact SVD time and captured energy ‖R‖²/‖G‖²;
* the mean loss of the last 10 steps.

>>> result = run_bench(steps=20, hidden=128, layers=2)     # doctest: +SKIP
>>> print(result["text"])                                  # doctest: +SKIP
"""

from __future__ import annotations

import platform
import resource
import time
from typing import Any

VOCAB, ACTIVE, LAST = 32000, 1024, 10


def run_bench(*, steps: int = 100, rank: int | None = None, update_period: int = 50, scale: float = 0.25,
              lr: float = 1e-3, galore_lr: float | None = None, hidden: int = 512, layers: int = 8,
              batch_size: int = 4, seq_len: int = 64, threads: int = 1, seed: int = 0) -> dict[str, Any]:
    """Run AdamW, then GaLore 2, each in a spawned process; return the numbers and a printable summary."""
    import multiprocessing as mp

    rank = rank or hidden // 4
    cfg = {"steps": steps, "rank": rank, "update_period": update_period, "scale": scale, "lr": lr,
           "galore_lr": galore_lr or lr, "hidden": hidden, "layers": layers, "batch_size": batch_size,
           "seq_len": seq_len, "threads": threads, "seed": seed}
    ctx = mp.get_context("spawn")
    pipes, procs = {}, []
    for name in ("adamw", "galore2"):
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(there, name, cfg), daemon=True)
        proc.start()
        pipes[name] = here
        procs.append(proc)
    try:
        for name in pipes:
            _answer(pipes[name].recv())  # "ready" once the model and data are built
        for _ in range(steps):  # alternate single steps, so load from other work on the machine hits both alike
            for conn in pipes.values():
                conn.send("step")
                _answer(conn.recv())
        runs = {}
        for name, conn in pipes.items():
            conn.send("finish")
            runs[name] = _answer(conn.recv())
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    a, g = runs["adamw"], runs["galore2"]
    ratios = {"state_projected": g["state_projected"] / a["state_projected"], "state_total": g["state"] / a["state"],
              "peak_rss": g["peak_rss"] / a["peak_rss"], "step_time": g["step_s"] / a["step_s"],
              "opt_step_time": g["opt_s"] / a["opt_s"], "final_loss": g["final_loss"] / a["final_loss"]}
    return {"config": cfg, "adamw": a, "galore2": g, "ratios": ratios, "text": _summary(cfg, a, g, ratios)}


def _summary(cfg: dict[str, Any], a: dict[str, Any], g: dict[str, Any], r: dict[str, float]) -> str:
    mb = 1 / 2**20
    svd = g["svd"]
    lines = [
        f"Llama {a['params'] / 1e6:.1f}M params (hidden {cfg['hidden']}, {cfg['layers']} layers, vocab {VOCAB}); "
        f"{cfg['steps']} steps of {cfg['batch_size']}×{cfg['seq_len']} tokens; {cfg['threads']} thread(s); "
        f"{platform.processor() or platform.machine()}",
        f"GaLore 2: rank {cfg['rank']}, update period {cfg['update_period']} ({g['refreshes']} refreshes, "
        f"{g['svd_calls']} SVDs), scale {cfg['scale']}, lr {cfg['galore_lr']} (AdamW lr {cfg['lr']})",
        f"{'':24}{'AdamW':>12}{'GaLore 2':>12}{'ratio':>8}",
        f"{'state, projected (MiB)':24}{a['state_projected'] * mb:12.1f}{g['state_projected'] * mb:12.1f}"
        f"{r['state_projected']:8.3f}",
        f"{'  paper side rule':24}{'':12}{g['state_projected_paper_rule'] * mb:12.1f}"
        f"{g['state_projected_paper_rule'] / a['state_projected']:8.3f}",
        f"{'state, total (MiB)':24}{a['state'] * mb:12.1f}{g['state'] * mb:12.1f}{r['state_total']:8.3f}",
        f"{'peak RSS (MiB)':24}{a['peak_rss'] * mb:12.1f}{g['peak_rss'] * mb:12.1f}{r['peak_rss']:8.3f}",
        f"{'step time (ms)':24}{a['step_s'] * 1e3:12.1f}{g['step_s'] * 1e3:12.1f}{r['step_time']:8.3f}",
        f"{'  of which opt.step':24}{a['opt_s'] * 1e3:12.1f}{g['opt_s'] * 1e3:12.1f}{r['opt_step_time']:8.3f}",
        f"{'  refresh steps (ms)':24}{'':12}{g['refresh_step_s'] * 1e3:12.1f}",
        f"{'first loss':24}{a['first_loss']:12.4f}{g['first_loss']:12.4f}",
        f"{f'loss, last {LAST} steps':24}{a['final_loss']:12.4f}{g['final_loss']:12.4f}{r['final_loss']:8.3f}",
        f"SVD on {svd['matrices']} final gradients: randomized {svd['randomized_s'] * 1e3:.0f} ms vs exact "
        f"{svd['exact_s'] * 1e3:.0f} ms ({svd['exact_s'] / svd['randomized_s']:.1f}× faster); captured energy "
        f"{svd['randomized_energy']:.4f} vs {svd['exact_energy']:.4f} "
        f"({svd['randomized_energy'] / svd['exact_energy']:.2%} of exact)",
    ]
    return "\n".join(lines)


def markov_tokens(n: int, seed: int) -> Any:
    """`n` tokens of a seeded Markov chain over ACTIVE of the vocabulary's ids: each token is followed by one
    of 4 tokens (probabilities .6/.2/.1/.1), so a few hundred steps learn unigram and bigram statistics."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    active = (torch.randperm(VOCAB - 4, generator=gen)[:ACTIVE] + 4).tolist()
    succ = torch.randint(0, ACTIVE, (ACTIVE, 4), generator=gen).tolist()
    choice = torch.multinomial(torch.tensor([0.6, 0.2, 0.1, 0.1]), n, replacement=True, generator=gen).tolist()
    out, state = [], 0
    for c in choice:
        state = succ[state][c]
        out.append(active[state])
    return torch.tensor(out)


def _model(cfg: dict[str, Any]):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    h = cfg["hidden"]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=int(h * 8 / 3 + 63) // 64 * 64,
                         num_hidden_layers=cfg["layers"], num_attention_heads=max(1, h // 64),
                         max_position_embeddings=max(cfg["seq_len"], 128), tie_word_embeddings=False)
    torch.manual_seed(cfg["seed"])
    return AutoModelForCausalLM.from_config(config)


def _answer(msg: Any) -> Any:
    if isinstance(msg, BaseException):
        raise msg
    return msg


def _worker(conn: Any, name: str, cfg: dict[str, Any]) -> None:
    """One optimizer in its own process (its own peak RSS): build, then one step per "step" message."""
    try:
        run = _Run(name, cfg)
        conn.send("ready")
        while conn.recv() == "step":
            run.step()
            conn.send("ok")
        conn.send(run.result())
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(RuntimeError(f"{name}: {type(e).__name__}: {e}"))
    finally:
        conn.close()


class _Run:
    def __init__(self, name: str, cfg: dict[str, Any]) -> None:
        import torch

        from paramdelta.optim import adamw

        from .optimizer import galore2
        from .options import targeted

        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        self.name, self.cfg, self.net = name, cfg, _model(cfg)
        named = dict(self.net.named_parameters())
        self.projected = [named[n] for n in targeted({n: tuple(p.shape) for n, p in named.items()},
                                                     ("q", "k", "v", "o", "gate", "up", "down"), cfg["rank"])]
        if name == "adamw":
            self.opt = adamw(self.net, lr=cfg["lr"], weight_decay=0.0)
        else:
            self.opt = galore2(self.net, lr=cfg["galore_lr"], weight_decay=0.0, rank=cfg["rank"],
                               update_period=cfg["update_period"], scale=cfg["scale"], seed=cfg["seed"])
        rows, width = cfg["batch_size"], cfg["seq_len"]
        self.data = markov_tokens(cfg["steps"] * rows * width, cfg["seed"]).view(cfg["steps"], rows, width)
        self.losses, self.step_s, self.opt_s, self.refresh_s, self.calls = [], [], [], [], 0

    def step(self) -> None:
        opt, batch = self.opt, self.data[len(self.losses)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = self.net(input_ids=batch, labels=batch).loss
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        self.step_s.append(t2 - t0)
        self.opt_s.append(t2 - t1)
        self.losses.append(loss.item())
        if getattr(opt, "svd_calls", 0) > self.calls:
            self.calls = opt.svd_calls
            self.refresh_s.append(t2 - t0)

    def result(self) -> dict[str, Any]:
        from paramdelta.optim import state_bytes

        opt, losses = self.opt, self.losses
        out = {"params": sum(p.numel() for p in self.net.parameters()), "state": state_bytes(opt),
               "state_projected": sum(v.numel() * v.element_size() for p in self.projected
                                      for v in opt.state[p].values()),
               "step_s": sum(self.step_s) / len(self.step_s), "opt_s": sum(self.opt_s) / len(self.opt_s),
               "refresh_step_s": sum(self.refresh_s) / len(self.refresh_s) if self.refresh_s else 0.0,
               "refreshes": len(self.refresh_s), "svd_calls": getattr(opt, "svd_calls", 0),
               "first_loss": losses[0], "final_loss": sum(losses[-LAST:]) / len(losses[-LAST:]), "losses": losses}
        if self.name == "galore2":  # what the paper's side rule (moments along the larger side) would hold
            r = self.cfg["rank"]
            out["state_projected_paper_rule"] = sum(4 * (r * (2 * max(p.shape) + min(p.shape)) + 1)
                                                    for p in self.projected)
            out["svd"] = _svd_comparison([p.grad for p in self.projected], self.cfg["rank"], opt, self.projected)
        out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return out


def _svd_comparison(grads: list, rank: int, opt: Any, params: list) -> dict[str, Any]:
    """Randomized (q = r + 8, 2 power iterations) vs exact SVD on the same gradients: time and energy."""
    import torch

    from .projection import captured_energy, projector

    t_rand = t_exact = e_rand = e_exact = 0.0
    for i, (g, p) in enumerate(zip(grads, params)):
        side = opt.side_of(p)
        t0 = time.perf_counter()
        pr = projector(g, rank, side, generator=torch.Generator().manual_seed(i))
        t1 = time.perf_counter()
        pe = projector(g, rank, side, exact=True)
        t2 = time.perf_counter()
        t_rand, t_exact = t_rand + t1 - t0, t_exact + t2 - t1
        e_rand += captured_energy(g, pr, side)
        e_exact += captured_energy(g, pe, side)
    n = len(grads)
    return {"matrices": n, "randomized_s": t_rand, "exact_s": t_exact, "randomized_energy": e_rand / n,
            "exact_energy": e_exact / n}
