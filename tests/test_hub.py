"""Hub references, pull and push, through the real huggingface_hub client over real HTTP to tests/hubserver.py.

A Hub-compatible server runs on 127.0.0.1 (a free port) for the module; it is seeded by pushing tiny
checkpoints with `paramdelta.hub.push`, i.e. with the real client, so every later read is of what the
client itself uploaded. HF_HOME/HF_HUB_CACHE point into tmp folders, telemetry is off, HF_ENDPOINT is the
local server and HF_TOKEN a sentinel that must never show up in output, metadata or cards. Nothing but
127.0.0.1 is contacted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from hubserver import HubServer, Repo
from tinymodels import load_state, make_checkpoint, make_triple

from paramdelta import hub as hubmod
from paramdelta.checkpoint import Checkpoint
from paramdelta.delta import apply
from paramdelta.plan import Term, job_reads, make_plan
from paramdelta.provenance import read_provenance

SENTINEL = "hf_SENTINEL_pdelta_token_must_never_be_printed_42"
NAMES = ("post", "base", "new-base", "other")


def _hub_env(mp: pytest.MonkeyPatch, url: str, home: Path) -> None:
    from huggingface_hub import constants

    mp.setenv("HF_ENDPOINT", url)
    mp.setenv("HF_HOME", str(home))
    mp.setenv("HF_HUB_CACHE", str(home / "hub"))
    mp.setenv("HF_TOKEN", SENTINEL)
    mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    mp.setenv("PDELTA_NO_PROGRESS", "1")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_XET", "PDELTA_DEBUG"):
        mp.delenv(var, raising=False)
    # huggingface_hub read HF_HOME at import: keep its token file lookups inside the tmp home too
    mp.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    mp.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))


def _commit_of(url: str) -> str:
    sha = url.rsplit("/", 1)[-1]
    assert re.fullmatch(r"[0-9a-f]{40}", sha), url
    return sha


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    post, base, new_base = make_triple(root, "llama")
    other = make_checkpoint(root / "other", "qwen2", seed=3)  # another architecture: pre-flight must refuse it
    return {"post": post, "base": base, "new-base": new_base, "other": other}


@pytest.fixture(scope="module")
def hub(tmp_path_factory, models):
    """The module's server, seeded through the real client: org/<name> for each tiny model."""
    root = tmp_path_factory.mktemp("hub")
    with HubServer(root / "server", token=SENTINEL) as server, pytest.MonkeyPatch.context() as mp:
        _hub_env(mp, server.url, root / "seed-home")
        server.commits = {n: _commit_of(hubmod.push(models[n], f"org/{n}")) for n in NAMES}
        yield server


@pytest.fixture
def cache(hub, tmp_path, monkeypatch) -> Path:
    """A fresh, empty huggingface_hub cache per test, pointing at the module's server; returns HF_HUB_CACHE."""
    _hub_env(monkeypatch, hub.url, tmp_path / "hf")
    hub.requests.clear()
    return tmp_path / "hf" / "hub"


def ref(hub: HubServer, name: str) -> str:
    return f"org/{name}@{hub.commits[name]}"


def pdelta(cli, *args) -> tuple[int, str, str]:
    """The CLI, with the token check every call must pass."""
    code, out, err = cli(*args)
    assert SENTINEL not in out + err
    return code, out, err


def one_line_error(code: int, err: str, *names: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and code == 2, f"exit {code}, stderr:\n{err}"
    assert lines[0].startswith("error: ") and "(fix: " in lines[0], lines[0]
    for n in names:
        assert n in lines[0], f"{n!r} not in {lines[0]}"
    return lines[0]


def sha256(f: Path) -> str:
    return hashlib.sha256(f.read_bytes()).hexdigest()


def files_under(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (symlinks followed), skipping huggingface_hub's .cache metadata."""
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and ".cache" not in p.relative_to(folder).parts}


def assert_same_tensors(a: Path, b: Path) -> None:
    sa, sb = load_state(a), load_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def no_sentinel_in(*folders: Path) -> None:
    for folder in folders:
        for p in folder.rglob("*"):
            if p.is_file():
                assert SENTINEL.encode() not in p.read_bytes(), p


# -- references ----------------------------------------------------------------------------------
def test_references_and_local_paths_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hubmod.parse_ref("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    assert hubmod.is_ref("org/name") and hubmod.is_ref("org/name@v1.0")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not hubmod.is_ref("org/name")  # an existing folder is always local
    for local in ("/abs/path", "./org/x", "a/b/c", "org/x.safetensors", "name"):
        assert not hubmod.is_ref(local), local


# -- push and pull -------------------------------------------------------------------------------
def test_push_then_pull_is_byte_identical(hub, cache, models, tmp_path, cli):
    """A ParamΔ output with an eval results JSON beside it: pushed to a new private repo on a branch, pulled
    back to a folder and into the cache; every file comes back with the same sha256."""
    merged = tmp_path / "merged"
    apply(merged, post=models["post"], base=models["base"], new_base=models["new-base"], max_shard_size="8KB",
          progress=False)
    (merged / "eval_results.json").write_text(json.dumps({
        "date": "2025-01-01", "tasks": ["pdelta_mc"],
        "models": [{"model": str(merged), "results": {"pdelta_mc": {"acc,none": 0.625, "acc_stderr,none": 0.01,
                                                                    "alias": "pdelta_mc"}}}]}))
    code, out, err = pdelta(cli, "push", merged, "me/merged", "--private", "--revision", "dev", "-m", "first")
    assert code == 0, err
    url = out.strip()
    assert url.startswith(f"{hub.url}/me/merged/commit/")
    commit = _commit_of(url)
    assert hub.repos["me/merged"].private and hub.repos["me/merged"].branches["dev"] == commit
    # classic LFS upload, no Xet (the endpoint is not huggingface.co)
    methods = {(r.method, re.sub(r"[0-9a-f]{64}", "OID", r.path)) for r in hub.requests}
    assert ("POST", "/me/merged.git/info/lfs/objects/batch") in methods and ("PUT", "/_lfs/OID") in methods
    assert not any("xet" in r.path for r in hub.requests)

    card = (merged / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert "paramdelta" in front["tags"] and "base_model" not in front  # local inputs: no Hub base models
    assert "| merged | pdelta_mc | acc | 0.6250 |" in card

    code, out, err = pdelta(cli, "pull", f"me/merged@{commit}", "--out", tmp_path / "pulled")
    assert code == 0, err
    assert files_under(tmp_path / "pulled") == files_under(merged)
    code, out, err = pdelta(cli, "pull", "me/merged@dev", "--format", "json")
    assert code == 0, err
    got = json.loads(out)
    assert got["commit"] == commit and Path(got["path"]) == cache / "models--me--merged" / "snapshots" / commit
    assert files_under(Path(got["path"])) == files_under(merged)
    assert f"me/merged@{commit}" in err  # `dev` is a branch: the warning names the commit to pin


def test_a_fresh_pdelta_process_pushes_with_lfs_and_pulls(hub, cache, models, tmp_path):
    """The user's path: huggingface_hub is first imported by paramdelta itself, after HF_HUB_DISABLE_XET is set."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = [sys.executable, "-m", "paramdelta.cli.main"]
    got = subprocess.run([*run, "push", models["base"], "me/fresh"], env=env, capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip().startswith(f"{hub.url}/me/fresh/commit/") and SENTINEL not in got.stdout + got.stderr
    assert any(r.path == "/me/fresh.git/info/lfs/objects/batch" for r in hub.requests)
    commit = _commit_of(got.stdout.strip())
    got = subprocess.run([*run, "pull", f"me/fresh@{commit}", "--out", tmp_path / "back"], env=env,
                         capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    assert files_under(tmp_path / "back") == files_under(models["base"])


def test_apply_from_hub_references_at_pinned_revisions(hub, cache, models, tmp_path, cli):
    """All three inputs from the Hub: the same tensors as from local folders, commits in the provenance,
    then --push-to publishes it with a card naming the Hub base models."""
    local = tmp_path / "local"
    apply(local, post=models["post"], base=models["base"], new_base=models["new-base"], progress=False)
    out = tmp_path / "out"
    code, stdout, err = pdelta(cli, "apply", "--post", ref(hub, "post"), "--base", ref(hub, "base"),
                               "--new-base", ref(hub, "new-base"), "--out", out, "--push-to", "me/from-hub")
    assert code == 0, err
    assert "warning" not in err  # every reference is pinned
    assert_same_tensors(out, local)
    assert (out / "tokenizer.json").read_bytes() == (models["post"] / "tokenizer.json").read_bytes()

    inputs = {r["role"]: r for r in read_provenance(Checkpoint.open(out))["inputs"]}
    for role, name in (("new_base", "new-base"), ("post[0]", "post"), ("base[0]", "base")):
        rec = inputs[role]
        assert (rec["ref"], rec["repo"], rec["revision"]) == (ref(hub, name), f"org/{name}", hub.commits[name])
        for shard, fp in rec["files"].items():  # the Hub knows each LFS file's sha256: recorded for free
            assert fp["sha256"] == sha256(models[name] / shard)

    pushed = _commit_of(re.search(r"pushed: (\S+)", stdout).group(1))
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == ["org/new-base", "org/post"] and front["base_model_relation"] == "merge"
    assert f"`org/post@{hub.commits['post']}`" in card
    code, _, err = pdelta(cli, "pull", f"me/from-hub@{pushed}", "--out", tmp_path / "back")
    assert code == 0, err
    assert files_under(tmp_path / "back") == files_under(out)
    no_sentinel_in(out, tmp_path / "back", cache, hub.root)
    assert any(r.authorized for r in hub.requests)  # the token was used, just never shown


def test_unpinned_reference_warns_with_the_commit_to_pin(hub, cache, cli):
    code, out, err = pdelta(cli, "inspect", "org/post", "--format", "json")
    assert code == 0, err
    assert f"warning: org/post is not pinned; it resolved to commit {hub.commits['post']}" in err
    assert f"org/post@{hub.commits['post']}" in err


def test_inspect_reads_only_headers_from_the_hub(hub, cache, models, cli):
    code, out, err = pdelta(cli, "inspect", ref(hub, "post"), "--format", "json")
    assert code == 0, err
    assert hub.weight_bytes() == 0 and not hub.shard_gets()
    local = Checkpoint.open(models["post"])
    remote = Checkpoint.open(ref(hub, "post"))
    assert [(t.name, t.shape, t.dtype, t.start, t.file.name) for t in remote.tensors.values()] == \
           [(t.name, t.shape, t.dtype, t.start, t.file.name) for t in local.tensors.values()]


def test_preflight_reports_mismatches_before_any_weight_byte(hub, cache, tmp_path, cli):
    out = tmp_path / "out"
    code, _, err = pdelta(cli, "apply", "--post", ref(hub, "other"), "--base", ref(hub, "base"),
                          "--new-base", ref(hub, "new-base"), "--out", out)
    line = one_line_error(code, err, "problems found before reading any weight", "model_type")
    assert "org--other" in line
    assert hub.weight_bytes() == 0 and not hub.shard_gets()
    assert not list(cache.rglob("*.safetensors")) and not out.exists()
    ranges = [r.range for r in hub.requests if r.path.endswith(".safetensors")]
    assert ranges and all(r and r.startswith("bytes=") for r in ranges)  # headers by range request only


# -- streaming -----------------------------------------------------------------------------------
def _shard_bytes_on_disk(cache: Path) -> int:
    """Bytes of LFS blobs (sha256-named; the json/tokenizer files are git-sha1-named), complete or not."""
    total = 0
    for p in cache.glob("models--*/blobs/*"):
        if re.match(r"[0-9a-f]{64}", p.name):
            try:
                total += p.stat().st_size
            except FileNotFoundError:  # deleted while we looked
                pass
    return total


def test_streaming_keeps_shards_on_disk_within_max_cache(hub, cache, models, tmp_path, cli):
    refs = ["--post", ref(hub, "post"), "--base", ref(hub, "base"), "--new-base", ref(hub, "new-base")]
    code, _, err = pdelta(cli, "apply", *refs, "--out", tmp_path / "x", "--max-cache", "1KB")
    line = one_line_error(code, err, "--max-cache")
    need = int(re.search(r"the ([\d,]+) bytes", line).group(1).replace(",", ""))
    assert hub.weight_bytes() == 0  # refused before any download

    total = sum(f.stat().st_size for m in ("post", "base", "new-base") for f in models[m].glob("*.safetensors"))
    assert need < total  # the bound is below the whole: shards must come and go during the run
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.wait(0.0005):
            peak[0] = max(peak[0], _shard_bytes_on_disk(cache))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        code, _, err = pdelta(cli, "apply", *refs, "--out", tmp_path / "out", "--max-cache", str(need))
    finally:
        stop.set()
        watcher.join()
    assert code == 0, err
    assert 0 < peak[0] <= need
    assert _shard_bytes_on_disk(cache) == 0  # every shard this run downloaded is gone again
    local = tmp_path / "local"
    apply(local, post=models["post"], base=models["base"], new_base=models["new-base"], progress=False)
    assert_same_tensors(tmp_path / "out", local)

    # downloads come in the order the engine needs them: the new base's on-disk order decides
    plan = make_plan(Checkpoint.open(models["new-base"]),
                     [Term(1.0, post=Checkpoint.open(models["post"]), base=Checkpoint.open(models["base"]))])
    owner = {Checkpoint.open(models[m]).path: m for m in ("post", "base", "new-base")}
    expected = list(dict.fromkeys((owner[ck.path], ck.tensors[n].file.name)
                                  for job in plan.jobs for ck, n in job_reads(plan, job)))
    got = [(re.match(r"/org/([\w-]+)/resolve/", p).group(1), p.rsplit("/", 1)[-1]) for p in hub.shard_gets()]
    assert got == expected

    # the shards left the cache, yet verify still re-reads the exact inputs: by repo@commit from provenance
    code, _, err = pdelta(cli, "verify", tmp_path / "out", "--no-load")
    assert code == 0, err


# -- offline -------------------------------------------------------------------------------------
def _clone(hub: HubServer) -> HubServer:
    """Another server over the same stored repos (it may be stopped or altered without touching `hub`)."""
    other = HubServer(hub.root, token=hub.token)
    other.repos = copy.deepcopy(hub.repos)
    other.commits = hub.commits
    return other.__enter__()


def test_offline_resolves_from_the_cache_after_the_server_stops(hub, cache, models, tmp_path, cli, monkeypatch):
    server = _clone(hub)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    args = ["--post", "org/post", "--base", ref(hub, "base"), "--new-base", ref(hub, "new-base")]
    code, _, err = pdelta(cli, "apply", *args, "--out", tmp_path / "online")
    assert code == 0, err
    server.stop()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # branch names resolve through the cache's refs/
    code, _, err = pdelta(cli, "apply", *args, "--out", tmp_path / "offline")
    assert code == 0, err
    assert f"org/post@{hub.commits['post']}" in err
    assert_same_tensors(tmp_path / "offline", tmp_path / "online")
    code, out, err = pdelta(cli, "pull", "org/post")
    assert code == 0, err
    assert out.strip().endswith(str(cache / "models--org--post" / "snapshots" / hub.commits["post"]))

    code, _, err = pdelta(cli, "inspect", ref(hub, "other"))  # never fetched
    one_line_error(code, err, ref(hub, "other"), "HF_HUB_OFFLINE", f"pdelta pull {ref(hub, 'other')}")

    monkeypatch.delenv("HF_HUB_OFFLINE")  # no flag, server down: the cache still answers, with a warning
    code, _, err = pdelta(cli, "apply", *args, "--out", tmp_path / "down")
    assert code == 0, err
    assert f"cannot reach {server.url}" in err


def test_a_shard_missing_from_the_cache_names_the_reference_and_the_fix(hub, cache, tmp_path, cli, monkeypatch):
    code, _, err = pdelta(cli, "inspect", ref(hub, "post"))  # headers only: shards stay on the server
    assert code == 0, err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = pdelta(cli, "apply", "--post", ref(hub, "post"), "--base", ref(hub, "post"),
                          "--new-base", ref(hub, "post"), "--out", tmp_path / "out")
    one_line_error(code, err, ref(hub, "post"), "model-00001-of-00003.safetensors", "pdelta pull org/post@")


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["unknown-repo", "gated-no-token", "gated-no-access", "revision-not-found",
                                  "server-down", "rate-limited"])
def test_hub_errors_are_one_line(case, hub, cache, tmp_path, cli, monkeypatch):
    server = _clone(hub)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    server.repos["org/gated"] = Repo(gated=True, branches=dict(server.repos["org/post"].branches))
    target, expect = {
        "unknown-repo": ("org/nope@main", "no repo org/nope"),
        "gated-no-token": ("org/gated", "gated repo and no token is set"),
        "gated-no-access": ("org/gated", "gated repo and your token has no access"),
        "revision-not-found": ("org/post@v9", "has no revision 'v9'"),
        "server-down": (ref(hub, "post"), f"cannot reach {server.url}"),
        "rate-limited": ("org/post", "rate limited"),
    }[case]
    if case == "gated-no-token":
        monkeypatch.delenv("HF_TOKEN")
    if case == "gated-no-access":
        server.token = "hf_another_users_token"
    if case == "server-down":
        server.stop()
    server.rate_limited = case == "rate-limited"
    try:
        code, _, err = pdelta(cli, "apply", "--new-base", target, "--post", ref(hub, "post"),
                              "--base", ref(hub, "base"), "--out", tmp_path / "out")
        one_line_error(code, err, target, expect)
        code, _, err = pdelta(cli, "pull", target)
        one_line_error(code, err, target, expect)
    finally:
        server.stop()


def test_push_errors_are_one_line(hub, cache, models, cli, monkeypatch):
    code, _, err = pdelta(cli, "push", models["post"], "org/x@main")
    one_line_error(code, err, "not a Hub repo id")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    code, _, err = pdelta(cli, "push", models["post"], "me/denied")
    one_line_error(code, err, "me/denied", "refused the upload (HTTP 401)")


# -- recipes -------------------------------------------------------------------------------------
def test_recipe_pull_apply_push(hub, cache, models, tmp_path, cli):
    recipe = tmp_path / "hub.yaml"
    recipe.write_text(yaml.safe_dump({
        "version": 1, "name": "hub-roundtrip",
        "vars": {"post": ref(hub, "post"), "base": ref(hub, "base"), "new_base": ref(hub, "new-base")},
        "steps": [
            {"id": "fetched", "op": "pull", "ref": "${post}"},
            {"id": "merge", "op": "apply", "post": "${fetched}", "base": "${base}", "new_base": "${new_base}",
             "max_cache": "10MB"},
            {"id": "publish", "op": "push", "model": "${merge}", "repo": "me/recipe", "message": "from a recipe"},
        ]}))
    run_dir = tmp_path / "runs"
    code, out, err = pdelta(cli, "run", recipe, "--run-dir", run_dir, "--dry-run", "--format", "json")
    assert code == 0, err
    planned = {s["id"]: s for s in json.loads(out)["steps"]}
    assert planned["fetched"]["detail"]["commit"] == hub.commits["post"]
    assert planned["publish"]["detail"]["repo"] == "me/recipe"

    code, out, err = pdelta(cli, "run", recipe, "--run-dir", run_dir, "--format", "json")
    assert code == 0, err
    assert [s["status"] for s in json.loads(out)["steps"]] == ["ran", "ran", "ran"]
    assert files_under(run_dir / "fetched").items() >= files_under(models["post"]).items()
    url = json.loads((run_dir / "publish.json").read_text())["commit_url"]
    assert hub.repos["me/recipe"].branches["main"] == _commit_of(url)
    local = tmp_path / "local"
    apply(local, post=models["post"], base=models["base"], new_base=models["new-base"], progress=False)
    assert_same_tensors(run_dir / "merge", local)
    code, out, err = pdelta(cli, "run", recipe, "--run-dir", run_dir, "--format", "json")
    assert code == 0, err
    assert [s["status"] for s in json.loads(out)["steps"]] == ["skipped (unchanged)"] * 3


def test_whole_model_commands_pull_hub_references(hub, cache, models, tmp_path):
    """eval and train hand a whole model to transformers: a Hub reference is pulled into the cache first."""
    import torch

    from paramdelta.plugins import load_model
    from paramdelta.train import train

    model, tok = load_model(ref(hub, "post"))
    local, _ = load_model(models["post"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))
    assert tok("hello world")["input_ids"]
    data = tmp_path / "d.txt"
    data.write_text("the cat sat on the mat\n" * 8)
    report = train(ref(hub, "post"), data, tmp_path / "trained", steps=2, batch_size=2, seq_len=16, progress=False)
    assert report.steps == 2 and (tmp_path / "trained" / "config.json").is_file()
