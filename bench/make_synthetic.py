"""Synthetic Llama-shaped checkpoint triples (base, post, new_base) for benchmarks.

    python bench/make_synthetic.py OUT_DIR --params 1.5e9 --dtype bfloat16 --shards 4 [--seed 0]

writes OUT_DIR/base, OUT_DIR/post and OUT_DIR/new_base, each a Hugging Face Llama checkpoint:
`config.json` (LlamaForCausalLM), `model-0000i-of-0000N.safetensors` shards and
`model.safetensors.index.json`, with the tensor names transformers uses. post and new_base are
base plus small seeded noise (independent for each), so ParamΔ has real work to do.

Fast and memory-bounded: the three models are written together, tensor by tensor and chunk by
chunk, through a streaming safetensors writer (header computed up front, bytes appended in header
order). Random numbers are drawn once (one block of weights, two of noise) and reused at random
offsets with a per-tensor scale: values look like trained weights (std ~0.02, norms ~1) but are
not statistically independent, which a benchmark doesn't need. Peak memory is ~100 MB whatever
the model size. new_base's config differs from base's in rope_theta and max_position_embeddings,
so a merge that takes its architecture from the right source is visible.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

VOCAB = 32_000
ROLES = ("base", "post", "new_base")
DTYPES = {
    "bfloat16": (torch.bfloat16, "BF16"),
    "float16": (torch.float16, "F16"),
    "float32": (torch.float32, "F32"),
}
CHUNK = 1 << 20  # elements computed and written at a time
BLOCK = 1 << 23  # elements of random values drawn once and reused at random offsets


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int = VOCAB

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in the order transformers' LlamaForCausalLM declares them."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        out = [("model.embed_tokens.weight", (v, h))]
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}."
            out += [
                (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, q)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]

    def num_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())


def _shape_for_width(hidden: int, layers: int) -> LlamaShape:
    head_dim = 64 if hidden < 1024 else 128
    heads = hidden // head_dim
    kv_heads = heads // 4 if heads % 4 == 0 and heads >= 8 else heads  # grouped-query attention
    intermediate = -(-8 * hidden // 3 // 256) * 256  # Llama's 8/3·h, rounded up to 256
    return LlamaShape(hidden, intermediate, layers, heads, kv_heads, head_dim)


def llama_shape(params: float) -> LlamaShape:
    """The Llama shape whose parameter count is closest to `params` with a usual aspect ratio.

    Widths are multiples of 256 (512 from 1024 up, so heads come in fours for grouped-query
    attention); among shapes within 3% of the target, the one whose hidden/layers ratio is
    nearest 80 (Llama-like) wins.

    >>> s = llama_shape(1.5e9); (s.hidden_size, s.num_hidden_layers)
    (2048, 30)
    """
    candidates = []
    for hidden in [128, *range(256, 1024, 256), *range(1024, 16_385, 512)]:
        one_layer = _shape_for_width(hidden, 1)
        per_layer = one_layer.num_params() - _shape_for_width(hidden, 0).num_params()
        layers = max(1, round((params - _shape_for_width(hidden, 0).num_params()) / per_layer))
        shape = _shape_for_width(hidden, layers)
        err = abs(shape.num_params() - params) / params
        candidates.append((err, abs(math.log(hidden / layers / 80)), shape))
    close = [c for c in candidates if c[0] <= 0.03]
    if close:
        return min(close, key=lambda c: c[1])[2]
    return min(candidates, key=lambda c: c[0])[2]


def llama_config(shape: LlamaShape, dtype: str, role: str) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10_000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": dtype,  # transformers 5 name; older files say "torch_dtype"
        "use_cache": True,
    }
    if role == "new_base":  # a "newer base" with a longer context, as in Llama 3 -> 3.1
        config.update(max_position_embeddings=8192, rope_theta=500_000.0)
    return config


class SafetensorsStreamWriter:
    """Writes one safetensors file whose tensor list is known up front, bytes appended in order.

    >>> w = SafetensorsStreamWriter(path, [("a", "BF16", (2, 3))])   # doctest: +SKIP
    >>> w.write(torch.zeros(6, dtype=torch.bfloat16)); w.close()     # doctest: +SKIP
    """

    def __init__(self, path: Path, tensors: list[tuple[str, str, tuple[int, ...]]], itemsize: int):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in tensors:
            nbytes = math.prod(shape) * itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self.path, self.expected, self.written = path, offset, 0
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, chunk: torch.Tensor) -> None:
        data = chunk.contiguous().view(-1).view(torch.uint8).numpy()
        if self.written + data.nbytes > self.expected:
            raise ValueError(f"{self.path}: more bytes written than the header declares ({self.expected})")
        self.file.write(memoryview(data))
        self.written += data.nbytes

    def close(self) -> None:
        self.file.close()
        if self.written != self.expected:
            raise ValueError(f"{self.path}: wrote {self.written} bytes, header declares {self.expected}")


def split_shards(tensors: list[tuple[str, tuple[int, ...]]], shards: int) -> list[list[int]]:
    """Split tensor indices, in order, into up to `shards` groups of roughly equal bytes."""
    sizes = [math.prod(shape) for _, shape in tensors]
    total, start, groups = sum(sizes), 0, [[] for _ in range(shards)]
    for index, size in enumerate(sizes):
        midpoint = start + size / 2
        groups[min(shards - 1, int(midpoint * shards / total))].append(index)
        start += size
    return [g for g in groups if g]  # a tensor larger than a shard leaves a group empty


def generate(
    out_dir: Path,
    params: float,
    dtype: str = "bfloat16",
    shards: int = 4,
    seed: int = 0,
    delta: float = 0.05,
    log=None,
) -> dict:
    """Write base/post/new_base under out_dir; return a summary (shape, bytes, files, seconds).

    >>> generate(Path("/tmp/syn"), 5e7, shards=2)["num_params"] > 4e7   # doctest: +SKIP
    True
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    torch_dtype, st_dtype = DTYPES[dtype]
    itemsize = torch.empty(0, dtype=torch_dtype).element_size()
    shape = llama_shape(params)
    tensors = shape.tensors()
    groups = split_shards(tensors, shards)
    n = len(groups)
    names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    total_bytes = shape.num_params() * itemsize

    gen = torch.Generator().manual_seed(seed)
    weights = (torch.randn(BLOCK + CHUNK, generator=gen) * 0.02).to(torch_dtype)
    noise = {
        r: (torch.randn(BLOCK + CHUNK, generator=gen) * 0.02 * delta).to(torch_dtype) for r in ("post", "new_base")
    }
    rng = random.Random(seed)
    bufs = {r: torch.empty(CHUNK, dtype=torch_dtype) for r in ROLES}

    dirs = {r: out_dir / r for r in ROLES}
    for d in dirs.values():
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(llama_config(shape, dtype, d.name), indent=2) + "\n")
        index = {
            "metadata": {"total_size": total_bytes, "total_parameters": shape.num_params()},
            "weight_map": {tensors[i][0]: names[k] for k, g in enumerate(groups) for i in g},
        }
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    for k, group in enumerate(groups):
        header = [(tensors[i][0], st_dtype, tensors[i][1]) for i in group]
        writers = {r: SafetensorsStreamWriter(dirs[r] / names[k], header, itemsize) for r in ROLES}
        for i in group:
            name, tshape = tensors[i]
            is_norm = len(tshape) == 1
            scale = rng.uniform(0.7, 1.3)
            remaining = math.prod(tshape)
            while remaining:
                c = min(CHUNK, remaining)
                o = rng.randrange(BLOCK)
                base = bufs["base"][:c]
                if is_norm:  # RMSNorm weights sit near 1
                    torch.add(weights[o : o + c], 1.0, out=base)
                else:
                    torch.mul(weights[o : o + c], scale, out=base)
                writers["base"].write(base)
                for r in ("post", "new_base"):
                    o = rng.randrange(BLOCK)  # norms get noise of the same relative size as matrices
                    torch.add(base, noise[r][o : o + c], alpha=50.0 if is_norm else 1.0, out=bufs[r][:c])
                    writers[r].write(bufs[r][:c])
                remaining -= c
        for w in writers.values():
            w.close()
        log(f"  shard {k + 1}/{n} written ({time.perf_counter() - t0:.1f} s)")

    return {
        "out_dir": str(out_dir),
        "dtype": dtype,
        "seed": seed,
        "delta": delta,
        "num_params": shape.num_params(),
        "bytes_per_model": total_bytes,
        "shards": n,
        "shape": asdict(shape),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out_dir", type=Path, help="folder that receives base/, post/, new_base/ (replaced)")
    p.add_argument("--params", type=float, default=1.5e9, help="target parameter count (default 1.5e9)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--shards", type=int, default=4, help="number of shards per model (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--delta",
        type=float,
        default=0.05,
        help="std of post's and new_base's noise relative to the weights' 0.02 (default 0.05)",
    )
    args = p.parse_args(argv)
    if args.shards < 1 or args.params < 1e6:
        p.error("--shards must be >= 1 and --params >= 1e6")
    torch.set_num_threads(1)  # chunks are small; threads only add overhead here
    summary = generate(args.out_dir, args.params, args.dtype, args.shards, args.seed, args.delta)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
