"""Rebuild the R-Sparse quality model (plugins/pdelta_rsparse/README.md, "Quality") and run its report.

A 4-layer Llama (hidden 256, MLP 688, 4.2M parameters, 2048-token byte-level BPE) trained with the
core API on English docstrings of installed packages, then `quality_report` on docstrings of other
files. Four stages, each skipped when its output already exists in --work (so a rerun of the
report alone is quick):

1. corpus: every docstring of ≥ 200 characters (`ast.get_docstring`; `>>>` lines dropped, one
   docstring per line) of the Python standard library, torch, numpy and datasets, test and idlelib
   folders skipped; a file goes to heldout.txt when sha1(its absolute path) mod 20 is 0, to
   calib.txt when it is 1, else to train.txt. The split hashes absolute paths, so another machine
   or Python install gives another (equally valid) split;
2. tokenizer: a 2048-token byte-level BPE trained on train.txt;
3. model: `init_model` (seed 0), then `train` 1/3 of --steps at lr 3e-3 and 2/3 at 2e-3 (seed 1),
   batch 32 × 128 tokens, warmup 20 (--steps 1500: ~40 min on one shared core);
4. report: `pdelta_rsparse.quality.quality_report(model, heldout.txt, calibration=calib.txt)`,
   printed and written to --work/quality.json.

    python bench/rsparse_quality_model.py --stdlib /usr/lib/python3.11     # the README's model
    python bench/rsparse_quality_model.py --steps 20 --work /tmp/rsq-smoke  # end to end in minutes
    python bench/rsparse_quality_model.py --model /path/to/trained          # report only
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import re
import sys
import sysconfig
import time
from pathlib import Path

PACKAGES = ("torch", "numpy", "datasets")
CONFIG = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 4, "intermediate_size": 688, "max_position_embeddings": 256,
          "tie_word_embeddings": False}


def source_files(stdlib: Path) -> list[Path]:
    """The .py files read, in a fixed order: the standard library, then each package of PACKAGES."""
    files = [f for f in sorted(stdlib.rglob("*.py")) if "site-packages" not in f.parts]
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            sys.exit(f"rsparse_quality_model: package {name} is not installed (pip install {name})")
        files += sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.py"))
    return [f for f in files if "test" not in f.parts and "idlelib" not in f.parts]


def write_corpus(work: Path, stdlib: Path) -> None:
    """train.txt / heldout.txt / calib.txt: one docstring per line, split by file (see the module doc)."""
    parts: dict[str, list[str]] = {"train": [], "heldout": [], "calib": []}
    for f in source_files(stdlib):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        bucket = int(hashlib.sha1(str(f).encode()).hexdigest(), 16) % 20
        split = "heldout" if bucket == 0 else "calib" if bucket == 1 else "train"
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if not doc or len(doc) < 200:
                    continue
                lines = [x.strip() for x in re.sub(r"[ \t]+", " ", doc).strip().split("\n")]
                parts[split].append(" ".join(x for x in lines if x and not x.startswith(">>>")))
    for split, docs in parts.items():
        (work / f"{split}.txt").write_text("\n".join(docs) + "\n")
    print("corpus: " + ", ".join(f"{s}.txt {len(d)} docstrings, {sum(map(len, d))} chars" for s, d in parts.items()),
          file=sys.stderr)


def train_tokenizer(work: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((work / "train.txt").read_text().splitlines(), trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(work / "tok")


def train_model(work: Path, steps: int) -> Path:
    from paramdelta.train import init_model, train

    first = max(1, steps // 3)
    init_model(CONFIG, work / "tok", work / "init", seed=0, overwrite=True)
    common = {"batch_size": 32, "seq_len": 128, "warmup": min(20, first - 1), "progress": False,
              "overwrite": True, "log_every": 50}
    r1 = train(work / "init", work / "train.txt", work / "stage1", steps=first, lr=3e-3, **common)
    r2 = train(work / "stage1", work / "train.txt", work / "model", steps=max(1, steps - first), lr=2e-3,
               seed=1, **common)
    print(f"trained {first} + {max(1, steps - first)} steps: loss {r1.first_loss:.3f} → {r1.final_loss:.3f} → "
          f"{r2.final_loss:.3f}", file=sys.stderr)
    return work / "model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("bench/_work/rsparse-quality"), help="Folder for every stage.")
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                    help="Standard library folder to read (default: this Python's).")
    ap.add_argument("--steps", type=int, default=1500, help="Training steps in all (1/3 at 3e-3, 2/3 at 2e-3).")
    ap.add_argument("--model", type=Path, help="Skip training: report on this trained checkpoint.")
    ap.add_argument("--sparsity", default="0.4,0.5,0.7", help="Comma-separated sparsities.")
    ap.add_argument("--max-tokens", type=int, default=16384, help="Held-out tokens scored.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on shared cores).")
    args = ap.parse_args()

    import torch
    from pdelta_rsparse.quality import quality_report

    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not (work / "heldout.txt").is_file():
        write_corpus(work, args.stdlib)
    if args.model is None and not (work / "tok" / "tokenizer.json").is_file():
        train_tokenizer(work)
    model = args.model or (work / "model" if (work / "model" / "config.json").is_file() else
                           train_model(work, args.steps))
    result = quality_report(model, work / "heldout.txt", calibration=work / "calib.txt",
                            sparsities=[float(s) for s in args.sparsity.split(",")], max_tokens=args.max_tokens)
    result["seconds"] = round(time.perf_counter() - start, 1)
    (work / "quality.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(result["text"])


if __name__ == "__main__":
    main()
