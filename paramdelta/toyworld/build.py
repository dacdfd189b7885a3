"""Write a toy world to a folder: corpora, tokenizer, lm-eval tasks and the model config.

    world/
      pretrain_a.txt      facts A, declarative, one document per line    -> base
      instruct_a.jsonl    questions about facts A -> answers ({"messages"}) -> post, reference
      pretrain_b.txt      facts B alone (for reading; not a training step)
      pretrain_ab.txt     facts A ∪ B, declarative                       -> new base
      tokenizer/          word-level fast tokenizer with the chat template
      tasks/              toyworld_qa/mc/ppl YAMLs (absolute data paths), eval_b.jsonl, bios_b.jsonl
      model_config.json   the Llama config every model starts from
      world.json          the spec, the entities and facts, counts and the checks that passed

Nothing about facts B reaches the A corpora and no evaluation prompt appears in any training
corpus: both are checked before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from .tasks import PPL_FILE, QA_FILE, write_tasks
from .tokenizer import prompt, train_tokenizer
from .world import World, WorldSpec, corpora, leaks, make_world

# DESIGN §4's feasibility model: hidden 128, 2 layers, 4 heads, MLP 512; ~0.68M parameters with the
# ~600-word vocabulary. Embeddings untied, as in Llama 3 8B/70B: an input row gets no gradient while
# its token is absent, so the chat tokens, which only post-training uses, keep their initial rows
# in both bases and the post-training delta lands on the same rows in the new base. Tied, the
# output softmax moves every row at every step (Adam turns even tiny gradients into lr-sized
# steps), continued pretraining drags the chat tokens' rows elsewhere, and ParamΔ fails (measured:
# README.md).
MODEL = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128,
         "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
         "max_position_embeddings": 128, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
         "hidden_act": "silu", "initializer_range": 0.02}


def write_world(out: str | Path, spec: WorldSpec = WorldSpec(), *, overwrite: bool = False,
                model: dict | None = None) -> dict:
    """Generate the world of `spec` into `out` (a temp folder renamed when complete); returns world.json.

    >>> write_world("runs/world", WorldSpec(seed=0))["counts"]   # doctest: +SKIP
    {'pretrain_a': 4048, 'instruct_a': 3048, 'pretrain_ab': 6048, 'eval_b': 500, ...}
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace it")
    world = make_world(spec)
    data = corpora(world)
    checks = check_corpora(world, data)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tasks").mkdir(parents=True)
    for name in ("pretrain_a", "pretrain_b", "pretrain_ab"):
        (tmp / f"{name}.txt").write_text("\n".join(data[name]) + "\n")
    _jsonl(tmp / "instruct_a.jsonl", [{"messages": [{"role": "user", "content": q["question"]},
                                                    {"role": "assistant", "content": q["answer"]}]}
                                      for q in data["instruct_a"]])
    _jsonl(tmp / "tasks" / QA_FILE, [{"prompt": prompt(q["question"]), **q} for q in data["eval_b"]])
    _jsonl(tmp / "tasks" / PPL_FILE, [{"text": t} for t in data["bios_b"]])
    vocab = train_tokenizer(tokenizer_text(data), tmp / "tokenizer")
    config = {**MODEL, **(model or {}), "vocab_size": vocab, "eos_token_id": 0, "pad_token_id": 1,
              "bos_token_id": None}
    (tmp / "model_config.json").write_text(json.dumps(config, indent=2) + "\n")
    record = {"spec": dataclasses.asdict(spec), "counts": {k: len(v) for k, v in data.items()},
              "vocab_size": vocab, "checks": checks, "world": world.to_dict()}
    (tmp / "world.json").write_text(json.dumps(record, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    write_tasks(out / "tasks", out / "tasks")  # absolute paths: written once the folder has its final name
    return record


def tokenizer_text(data: dict) -> list[str]:
    """Every text a model will meet, without chat markup (special tokens are added by the tokenizer)."""
    qa = [f"{q['question']} {q['answer']}" for q in data["instruct_a"] + data["eval_b"]]
    return data["pretrain_ab"] + qa + data["bios_b"] + [" ".join(q["choices"]) for q in data["eval_b"]]


def check_corpora(world: World, data: dict) -> dict[str, int]:
    """Raise if facts B leak into the A corpora or an evaluation prompt into any training corpus."""
    a_texts = data["pretrain_a"] + [f"{q['question']} {q['answer']}" for q in data["instruct_a"]]
    leaked = leaks(world, a_texts)
    if leaked:
        raise AssertionError(f"B entities in the A corpora: {leaked[:5]}")
    training = data["pretrain_a"] + data["pretrain_ab"] + [q["question"] for q in data["instruct_a"]]
    questions = {q["question"] for q in data["eval_b"]}
    blob = "\n".join(training)
    inside = [q for q in sorted(questions) if q in blob]
    if inside:
        raise AssertionError(f"evaluation questions in a training corpus: {inside[:5]}")
    return {"b_names_checked": len(world.split("B")), "eval_questions_checked": len(questions),
            "training_documents_checked": len(training)}


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
