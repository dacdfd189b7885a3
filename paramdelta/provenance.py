"""What an output records about how it was made: shard metadata, side files and the model card.

Provenance goes into every shard's safetensors `__metadata__` (strings only, as the format
requires) so a single shard found on its own still says where it came from; `pdelta verify`
reads it back to recompute the output from its inputs.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from .checkpoint import TOKENIZER_FILES, Checkpoint

TOOL = "paramdelta"


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    try:
        return _v("paramdelta")
    except PackageNotFoundError:
        return "0+unknown"


def file_fingerprints(ckpt: Checkpoint, full_hash: bool = False) -> dict[str, dict[str, Any]]:
    """Per shard: size and the sha256 of its header (cheap, identifies names/dtypes/shapes/offsets),
    plus the sha256 of the whole file when asked (costs a full extra read), or when the Hub knows it."""
    out = {}
    for shard in ckpt.shards:
        entry: dict[str, Any] = {"size": shard.size if shard.size is not None else shard.file.stat().st_size,
                                 "header_sha256": hashlib.sha256(shard.header_bytes).hexdigest()}
        known = ckpt.remote.sha256(shard.file.name) if ckpt.remote is not None else None
        if known:
            entry["sha256"] = known
        elif full_hash:
            h = hashlib.sha256()
            with open(shard.file, "rb") as f:
                while chunk := f.read(16 << 20):
                    h.update(chunk)
            entry["sha256"] = h.hexdigest()
        out[shard.file.name] = entry
    return out


def input_record(role: str, ckpt: Checkpoint, ref: str | None = None, full_hash: bool = False) -> dict[str, Any]:
    """One input as provenance: its role, the reference the user gave, resolved path and file hashes."""
    rec: dict[str, Any] = {"role": role, "ref": ref or str(ckpt.path), "path": str(ckpt.path.resolve()),
                           "files": file_fingerprints(ckpt, full_hash)}
    revision = ckpt.config.get("_pdelta_revision")
    if revision:
        rec["revision"] = revision
    if ckpt.remote is not None:  # a Hub reference: the repo and the commit it resolved to
        rec.update(repo=ckpt.remote.repo, revision=ckpt.remote.commit)
    return rec


def shard_metadata(kind: str, formula: str, alphas: list[float], inputs: list[dict[str, Any]],
                   extra: dict[str, Any] | None = None) -> dict[str, str]:
    """The `__metadata__` written into every output shard (all values are strings)."""
    meta = {"pdelta_tool": TOOL, "pdelta_version": version(), "pdelta_kind": kind, "pdelta_formula": formula,
            "pdelta_alpha": json.dumps(alphas), "pdelta_inputs": json.dumps(inputs)}
    for k, v in (extra or {}).items():
        meta[f"pdelta_{k}"] = v if isinstance(v, str) else json.dumps(v)
    return meta


def read_provenance(ckpt: Checkpoint) -> dict[str, Any]:
    """The provenance fields of a paramdelta output, decoded; {} for anything else."""
    meta = ckpt.metadata
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if k.startswith("pdelta_"):
            try:
                out[k.removeprefix("pdelta_")] = json.loads(v)
            except ValueError:
                out[k.removeprefix("pdelta_")] = v
    return out


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer, chat template and generation config files that exist in `src`."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def write_config(config: dict[str, Any], dst: Path, updates: dict[str, Any]) -> None:
    """Write config.json with `updates` applied (dtype, vocab size, tying) and private keys removed."""
    cfg = {k: v for k, v in config.items() if not k.startswith("_pdelta")}
    cfg.update({k: v for k, v in updates.items() if v is not None})
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def model_card(*, base_models: list[str], title: str, summary: list[str], sections: dict[str, list[str]],
               tags: tuple[str, ...] = ("paramdelta", "merge"), relation: str | None = "merge") -> str:
    """A Hub model card: YAML front matter the Hub understands, then what was done."""
    front = ["---", "library_name: transformers"] + ([f"base_model_relation: {relation}"] if relation else [])
    front += ["base_model:"]
    front += [f"- {json.dumps(m)}" for m in base_models]
    front += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    body = [f"# {title}", ""] + summary + [""]
    for head, lines in sections.items():
        body += [f"## {head}", ""] + lines + [""]
    body += [f"Made with {TOOL} {version()}."]
    return "\n".join(front + body) + "\n"


def write_hub_card(folder: Path) -> None:
    """Make `folder/README.md` a card the Hub reads before `push`: base_model lists the Hub inputs (new base,
    then post models), base_model_relation: merge for a merge, paramdelta tags, what was done with the commits
    it was done from, and the scores of an eval results JSON lying in the folder. A README.md that paramdelta
    did not write is left as it is."""
    import yaml

    card = folder / "README.md"
    text = card.read_text() if card.is_file() else ""
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    front = (yaml.safe_load(m.group(1)) if m else None) or {}
    body = text[m.end():] if m else text
    if text and TOOL not in (front.get("tags") or []):
        return
    prov = read_provenance(Checkpoint.open(folder)) if any(folder.glob("*.safetensors")) else {}
    merge = prov.get("kind") == "merge"
    inputs = [r for r in prov.get("inputs") or [] if r.get("repo")]
    bases = list(dict.fromkeys(r["repo"] for r in inputs if r["role"] == "new_base" or r["role"].startswith("post")))
    front = {"library_name": "transformers",
             **{k: v for k, v in front.items() if k not in ("base_model", "base_model_relation")}}
    if bases:
        front["base_model"] = bases
        if merge:
            front["base_model_relation"] = "merge"
    front["tags"] = list(dict.fromkeys([*(front.get("tags") or []), TOOL, *(["merge"] if merge else [])]))
    if not body.strip():
        done = f"`{prov['formula']}`, α = {prov.get('alpha')}.\n\n" if "formula" in prov else ""
        body = f"# {folder.name}\n\n{done}"
    body = re.split(r"\n## (?:Hub inputs|Evaluation)\n", body)[0].rstrip() + "\n"
    if inputs:
        body += "\n## Hub inputs\n\n" + "".join(f"- {r['role']}: `{r['repo']}@{r['revision']}`\n" for r in inputs)
    body += _eval_section(folder)
    front_text = yaml.safe_dump(front, sort_keys=False, allow_unicode=True)
    card.write_text(f"---\n{front_text}---\n\n{body.lstrip()}")


def _eval_section(folder: Path) -> str:
    """A scores table from the first `pdelta eval` results JSON in the folder ("" when there is none)."""
    for f in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not (isinstance(doc, dict) and isinstance(doc.get("models"), list)):
            continue
        rows = [f"| {Path(str(m.get('model'))).name} | {task} | {key.removesuffix(',none')} | {value:.4f} |"
                for m in doc["models"] if isinstance(m, dict)
                for task, metrics in (m.get("results") or {}).items()
                for key, value in metrics.items()
                if isinstance(value, (int, float)) and "_stderr" not in key]
        if rows:
            return (f"\n## Evaluation\n\nFrom `{f.name}` (lm-eval, {doc.get('date', 'date unknown')}):\n\n"
                    "| model | task | metric | value |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return ""
