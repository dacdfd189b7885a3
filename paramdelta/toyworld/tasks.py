"""The toy world's lm-eval tasks: questions about facts B in the instruction format.

Three local tasks over the world's held-out data (`eval_b.jsonl`, `bios_b.jsonl`):

- ``toyworld_qa`` (generate_until, greedy, at most 8 new tokens): the chat prompt
  ``<|user|> QUESTION<|assistant|>``; the model's reply is scored three ways —
  ``exact_match``: the reply, stripped of surrounding whitespace, is exactly the answer;
  ``format``: the stripped reply matches in full the answer pattern of the question's kind
  (a city or country: one capitalised word; a year: four digits; an occupation: one lowercase
  word; a mentor: two capitalised words), i.e. the model gave one answer of the right shape and
  then ended its turn — a reply that runs on after the answer, or never gives one, fails;
  ``prefix_match``: the reply begins with the right answer, whatever follows (what the model
  knows, regardless of format).
  The reply is what lm-eval returns: text generated before the end-of-turn token
  ``<|endoftext|>``, decoded with special tokens dropped.
- ``toyworld_mc`` (multiple choice): the same prompts, the answer among 4 candidates of its kind;
  ``acc`` by log-likelihood. A weak headline (a model that knows the facts as statements scores
  well without following the format), reported for completeness.
- ``toyworld_ppl`` (rolling log-likelihood): each B person's facts in the canonical declarative
  template; ``word_perplexity`` says how well a model knows facts B as text.

lm-eval resolves relative `data_files` against the working directory and `!function` against
the YAML's folder, so `write_tasks` writes the YAMLs (absolute data paths) and a one-line
module beside them into a folder given to `evaluate(..., include_path=[folder])`.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

TASKS = ("toyworld_qa", "toyworld_mc", "toyworld_ppl")
QA_FILE, PPL_FILE = "eval_b.jsonl", "bios_b.jsonl"
MAX_GEN_TOKS = 8
SHIM = "toyworld_metrics"  # module lm-eval imports from the task folder


def process_qa(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval `process_results` for toyworld_qa: exact_match, format and prefix_match of one reply."""
    reply = results[0].strip()
    answer = doc["answer"]
    return {"exact_match": float(reply == answer),
            "format": float(re.fullmatch(doc["pattern"], reply) is not None),
            "prefix_match": float(re.match(rf"{re.escape(answer)}(?![\w])", reply) is not None)}


def _mean(name: str) -> dict:
    return {"metric": name, "aggregation": "mean", "higher_is_better": True}


def task_configs(data_dir: Path) -> dict[str, dict]:
    """The three task configs with absolute data paths under `data_dir`."""
    data = {"qa": str((data_dir / QA_FILE).resolve()), "ppl": str((data_dir / PPL_FILE).resolve())}

    def json_task(name: str, kind: str, path: str) -> dict:
        return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": path}},
                "output_type": kind, "test_split": "test"}

    qa = json_task("toyworld_qa", "generate_until", data["qa"]) | {
        "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["<|endoftext|>"], "do_sample": False, "max_gen_toks": MAX_GEN_TOKS},
        "metric_list": [_mean("exact_match"), _mean("format"), _mean("prefix_match")],
        "metadata": {"version": 1.0}}
    mc = json_task("toyworld_mc", "multiple_choice", data["qa"]) | {
        "doc_to_text": "{{prompt}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
        "metric_list": [_mean("acc")], "metadata": {"version": 1.0}}
    ppl = json_task("toyworld_ppl", "loglikelihood_rolling", data["ppl"]) | {
        "doc_to_text": "", "doc_to_target": "{{text}}", "metric_list": [{"metric": "word_perplexity"}],
        "metadata": {"version": 1.0}}
    return {"toyworld_qa": qa, "toyworld_mc": mc, "toyworld_ppl": ppl}


def write_tasks(dst: Path, data_dir: Path) -> Path:
    """Write the task YAMLs for the data in `data_dir` into `dst` (an lm-eval include path)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name, cfg in task_configs(data_dir).items():
        text = yaml.safe_dump(cfg, sort_keys=False)
        if name == "toyworld_qa":  # a YAML tag safe_dump cannot write
            text += f"process_results: !function {SHIM}.process_qa\n"
        (dst / f"{name}.yaml").write_text(f"# Toy world task, written by paramdelta.toyworld.tasks.\n{text}")
    (dst / f"{SHIM}.py").write_text("from paramdelta.toyworld.tasks import process_qa  # noqa: F401\n")
    return dst
