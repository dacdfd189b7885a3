"""Hub references `org/name[@revision]` wherever a checkpoint is expected, and `pull` / `push`.

A reference that is not a local path resolves to one commit of a Hub repo on HF_ENDPOINT (huggingface.co
or any Hub-compatible server). Opening it downloads only the config, index and tokenizer files and reads
each shard's safetensors header with two HTTP range requests, so pre-flight sees every mismatch before a
weight byte moves. Shards land in the huggingface_hub cache when first read, or ahead of the engine
during `apply` (hubstream.py). With HF_HUB_OFFLINE=1, or when the Hub cannot be reached, a reference
resolves from the cache alone. Tokens come from HF_TOKEN or `hf auth login` and never appear in output.

>>> ckpt = Checkpoint.open("meta-llama/Llama-3.1-8B@main")       # doctest: +SKIP
>>> pull("org/model@v1.0", out="model")                           # doctest: +SKIP
(PosixPath('model'), '0b1c...')
>>> push("merged", "me/merged-model")                             # doctest: +SKIP
'https://huggingface.co/me/merged-model/commit/9f3e...'
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .checkpoint import (
    CONFIG_FILES,
    INDEX_NAME,
    SINGLE_NAME,
    TOKENIZER_FILES,
    Checkpoint,
    ShardHeader,
    _shards_from_index,
    header_length,
    parse_shard_header,
    read_shard_header,
)
from .errors import CheckpointError, OptionError, PdeltaError
from .progress import progress_enabled

HF_ENDPOINT = "https://huggingface.co"
PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer.model", "merges.txt", "README.md"]  # what pull fetches
_REF = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<rev>[^\s@]+))?")
_SHA = re.compile(r"[0-9a-f]{40}")


class HubError(PdeltaError):
    """A Hub reference cannot be resolved, fetched or pushed (one line, never the token)."""


# -- references and settings (read at call time: tests and recipes change them) ----------------
def is_ref(value: str | os.PathLike) -> bool:
    """Whether `value` names a Hub repo: `org/name[@revision]` with no such local path.

    >>> is_ref("meta-llama/Llama-3.1-8B@main"), is_ref("/models/llama")
    (True, False)
    """
    text = os.fspath(value)
    return bool(_REF.fullmatch(text)) and not text.endswith(".safetensors") and not Path(text).exists()


def local_folder(ref: str | os.PathLike, *, progress: bool = True) -> Path:
    """A local folder for `ref`: the path itself, or the Hub snapshot pulled into the cache.

    For commands that hand a whole model to transformers (eval, train) rather than stream it.
    """
    return pull(os.fspath(ref), progress=progress)[0] if is_ref(ref) else Path(ref)


def parse_ref(ref: str) -> tuple[str, str | None]:
    """("org/name", "revision" or None) from `org/name[@revision]`."""
    m = _REF.fullmatch(ref)
    if not m:
        raise OptionError(f"{ref!r} is not a Hub reference", hint="write it as org/name or org/name@revision")
    return m.group("repo"), m.group("rev")


def check_repo_id(repo: str) -> str:
    """`repo` if it is a repo id to push to (org/name, no revision)."""
    if not _REF.fullmatch(repo) or "@" in repo:
        raise OptionError(f"{repo!r} is not a Hub repo id", hint="write it as org/name; use --revision for a branch")
    return repo


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", HF_ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")).expanduser()


def offline() -> bool:
    return any(_truthy(os.environ.get(v)) for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _truthy(value: str | None) -> bool:
    return (value or "").upper() in ("1", "ON", "YES", "TRUE")


def _hf(progress: bool = True):
    """huggingface_hub with this process's settings. It reads HF_HUB_DISABLE_XET and HF_HUB_OFFLINE once, at
    import, and transformers or lm-eval may have imported it first, so both are re-read here. Endpoints other
    than huggingface.co do not speak Xet: uploads there go through the classic LFS protocol."""
    if endpoint() != HF_ENDPOINT:
        os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    import huggingface_hub
    from huggingface_hub import constants

    constants.HF_HUB_DISABLE_XET = _truthy(os.environ.get("HF_HUB_DISABLE_XET"))
    constants.HF_HUB_OFFLINE = offline()
    if not progress_enabled(progress):  # huggingface_hub's download bars follow paramdelta's switch
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    return huggingface_hub


def _storage(repo: str) -> Path:
    return cache_dir() / ("models--" + repo.replace("/", "--"))


def _warn_unpinned(ref: str, repo: str, rev: str | None, commit: str) -> None:
    if rev is None or not _SHA.fullmatch(rev):
        print(f"warning: {ref} is not pinned; it resolved to commit {commit}. For a reproducible run use "
              f"{repo}@{commit}", file=sys.stderr)


# -- errors: one line each -----------------------------------------------------------------
@contextmanager
def hub_errors(ref: str, *, pushing: bool = False) -> Iterator[None]:
    """Turn huggingface_hub and network exceptions into one-line HubErrors naming `ref`."""
    try:
        yield
    except PdeltaError:
        raise
    except Exception as e:
        mapped = _explain(e, ref, pushing)
        if mapped is None:
            raise
        raise mapped from e  # the cause shows only in PDELTA_DEBUG=1 tracebacks


def _explain(e: BaseException, ref: str, pushing: bool) -> HubError | None:
    import httpx2
    from huggingface_hub import errors as E
    from huggingface_hub.utils import get_token

    chain = [e]
    while len(chain) < 8 and (chain[-1].__cause__ is not None or chain[-1].__context__ is not None):
        chain.append(chain[-1].__cause__ or chain[-1].__context__)  # type: ignore[arg-type]
    err = next((c for c in chain if isinstance(c, (E.HfHubHTTPError, httpx2.TransportError))), e)
    m = _REF.fullmatch(ref)
    repo, rev = (m.group("repo"), m.group("rev")) if m else (ref, None)
    where, login = endpoint(), "set HF_TOKEN or run `hf auth login`"
    status = err.response.status_code if isinstance(err, E.HfHubHTTPError) and err.response is not None else None
    if isinstance(err, E.GatedRepoError):
        why = "your token has no access" if get_token() else "no token is set"
        return HubError(f"{ref}: {repo} is a gated repo and {why}",
                        hint=f"accept its terms on {where}/{repo}, then {login}")
    if isinstance(err, E.RepositoryNotFoundError):
        also = "" if pushing else f" (nor a local folder {ref})"
        return HubError(f"{ref}: no repo {repo} on {where}{also}",
                        hint=f"check the name; for a private repo {login} with a token that can read it")
    if isinstance(err, E.RevisionNotFoundError):
        return HubError(f"{ref}: {repo} has no revision {rev or 'main'!r}",
                        hint="use a branch, tag or commit that exists")
    if isinstance(err, E.RemoteEntryNotFoundError):
        return HubError(f"{ref}: a file is missing from {repo} on {where}",
                        hint="the repo is incomplete; pick another revision")
    if status == 429:
        return HubError(f"{ref}: rate limited by {where} (HTTP 429)",
                        hint=f"wait a few minutes and retry; {login} for higher limits")
    if status in (401, 403):
        return HubError(f"{ref}: {where} refused {'the upload' if pushing else 'access'} (HTTP {status})",
                        hint=f"{login} with a token that has {'write' if pushing else 'read'} access")
    if isinstance(err, httpx2.TransportError):
        return HubError(f"{ref}: cannot reach {where} ({type(err).__name__})",
                        hint="check the network or HF_ENDPOINT; with HF_HUB_OFFLINE=1 cached references still work")
    if isinstance(e, (E.OfflineModeIsEnabled, E.LocalEntryNotFoundError)):
        return HubError(f"{ref}: HF_HUB_OFFLINE is set and it is not in the local cache",
                        hint=f"run `pdelta pull {ref}` online")
    if status is not None:
        return HubError(f"{ref}: {where} answered HTTP {status}", hint="retry later; PDELTA_DEBUG=1 shows the details")
    return None


# -- opening a reference -----------------------------------------------------------------------
class ShardSource:
    """Where a Hub checkpoint's shards come from: Checkpoint calls `wait(file)` before it first opens one.

    A shard is fetched into the cache on first read, or by the `stream` that `apply` runs ahead of the engine.
    """

    def __init__(self, ref: str, repo: str, commit: str, files: dict[str, tuple[int, str | None]]):
        self.ref, self.repo, self.commit = ref, repo, commit
        self.files = files  # name -> (size, sha256 for LFS files); empty for a reference opened offline
        self.stream: Any = None  # hubstream.Stream while `apply` downloads ahead

    def wait(self, file: Path) -> None:
        if not file.exists() and (self.stream is None or not self.stream.wait(file)):
            self.fetch(file)

    def fetch(self, file: Path, progress: bool = True) -> None:
        with hub_errors(self.ref):
            _hf(progress).hf_hub_download(self.repo, file.name, revision=self.commit, cache_dir=cache_dir(),
                                  endpoint=endpoint())

    def size(self, name: str) -> int:
        return self.files[name][0]

    def sha256(self, name: str) -> str | None:
        return self.files.get(name, (0, None))[1]


def open_ref(ref: str) -> Checkpoint:
    """Open `org/name[@revision]` from its headers; weights download on first read (see ShardSource)."""
    repo, rev = parse_ref(ref)
    with hub_errors(ref):
        hf = _hf()
        if offline():
            return _open_cached(ref, "HF_HUB_OFFLINE is set")
        try:
            commit, files = _resolve(hf, repo, rev)
        except Exception as e:  # the Hub is unreachable: fall back on the cache, as huggingface_hub does
            import httpx2

            if not isinstance(e, httpx2.TransportError):
                raise
            ck = _open_cached(ref, f"cannot reach {endpoint()} ({type(e).__name__})")
            print(f"warning: cannot reach {endpoint()}; using {ref} from the local cache", file=sys.stderr)
            return ck
        _warn_unpinned(ref, repo, rev, commit)
        snapshot = _storage(repo) / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in (*CONFIG_FILES, *TOKENIZER_FILES, INDEX_NAME):
            if name in files and not (snapshot / name).exists():
                hf.hf_hub_download(repo, name, revision=commit, cache_dir=cache_dir(), endpoint=endpoint())
        source = ShardSource(ref, repo, commit, files)

        def header(file: Path) -> ShardHeader:
            if file.exists():
                return read_shard_header(file)
            if file.name not in files:
                raise CheckpointError(f"{ref}: the index names shard {file.name!r}, which is not in {repo}@{commit}",
                                      hint="the repo is incomplete; pick another revision")
            url = hf.hf_hub_url(repo, file.name, revision=commit, endpoint=endpoint())
            size = source.size(file.name)
            n = header_length(file, _range(url, 0, 8), size)
            return parse_shard_header(file, _range(url, 8, 8 + n), size)

        if INDEX_NAME in files:
            shards = _shards_from_index(snapshot / INDEX_NAME, read_header=header)
        else:
            loose = [n for n in files if n.endswith(".safetensors") and "/" not in n]
            name = SINGLE_NAME if SINGLE_NAME in files else (loose[0] if len(loose) == 1 else None)
            if name is None:
                raise CheckpointError(f"{ref}: no model.safetensors or {INDEX_NAME} in {repo}@{commit}",
                                      hint="ParamΔ reads safetensors; pick a repo or revision that has them")
            shards = [header(snapshot / name)]
    ck = Checkpoint(snapshot, shards)
    ck.remote = source
    return ck


def resolve(ref: str) -> tuple[str, dict[str, tuple[int, str | None]]]:
    """(commit, {file: (size, sha256 or None)}) that `ref` points at now, from one API call (cache only when
    offline, with no file list)."""
    repo, rev = parse_ref(ref)
    with hub_errors(ref):
        hf = _hf()
        if not offline():
            return _resolve(hf, repo, rev)
    commit = _cached_commit(repo, rev)
    if commit is None:
        raise HubError(f"{ref}: HF_HUB_OFFLINE is set and it is not in the local cache",
                       hint=f"run `pdelta pull {ref}` online")
    return commit, {}


def _resolve(hf, repo: str, rev: str | None) -> tuple[str, dict[str, tuple[int, str | None]]]:
    """The commit `rev` points at and the files there (size, LFS sha256), in one call; the branch or tag
    is remembered in the cache's refs/ so it resolves offline later."""
    info = hf.HfApi(endpoint=endpoint()).model_info(repo, revision=rev, files_metadata=True)
    if rev != info.sha:
        refs = _storage(repo) / "refs" / (rev or "main")
        refs.parent.mkdir(parents=True, exist_ok=True)
        tmp = refs.with_name(refs.name + ".pdelta-tmp")
        tmp.write_text(info.sha)
        tmp.replace(refs)
    return info.sha, {s.rfilename: (s.size or 0, s.lfs.sha256 if s.lfs else None) for s in info.siblings or []}


def _range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file on the Hub by an HTTP range request (a server ignoring Range is read up
    to `end` and cut off there)."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = {**build_hf_headers(), "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
    out = bytearray()
    with get_session().stream("GET", url, headers=headers) as r:
        if r.status_code >= 400:
            r.read()
            hf_raise_for_status(r)
        skip = start if r.status_code == 200 else 0
        for chunk in r.iter_bytes():
            out += chunk
            if len(out) >= skip + end - start:
                break
    return bytes(out[skip:skip + end - start])


def _cached_commit(repo: str, rev: str | None) -> str | None:
    if rev is not None and _SHA.fullmatch(rev):
        return rev
    refs = _storage(repo) / "refs" / (rev or "main")
    return refs.read_text().strip() if refs.is_file() else None


def _open_cached(ref: str, reason: str) -> Checkpoint:
    """A reference from the cache alone: every shard must be there already."""
    repo, rev = parse_ref(ref)
    commit = _cached_commit(repo, rev)
    snapshot = _storage(repo) / "snapshots" / str(commit)
    if commit is None or not snapshot.is_dir():
        raise HubError(f"{ref}: {reason} and it is not in the local cache (nor a local folder {ref})",
                       hint=f"run `pdelta pull {ref}` online")
    _warn_unpinned(ref, repo, rev, commit)
    index = snapshot / INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    else:
        names = [] if any(snapshot.glob("*.safetensors")) else [SINGLE_NAME]
    for name in names:
        if not (snapshot / name).exists():
            raise HubError(f"{ref}: {reason} and shard {name} is not in the local cache",
                           hint=f"run `pdelta pull {repo}@{commit}` online")
    ck = Checkpoint.open(snapshot)
    ck.remote = ShardSource(ref, repo, commit, {})
    return ck


def stream(plan, budget: int | None, progress: bool = True):
    """During `apply`: fetch the plan's Hub shards ahead of the engine, within `budget` bytes of disk.
    A context manager giving the `on_job` callback for run_plan (None when every input is local)."""
    from .hubstream import stream as _stream

    return _stream(plan, budget, progress)


# -- pull and push -------------------------------------------------------------------------------
def pull(ref: str, out: str | Path | None = None, *, progress: bool = True) -> tuple[Path, str]:
    """Download a reference's safetensors, json and tokenizer files; returns (folder, commit).

    Without `out` the folder is the huggingface_hub cache snapshot; with it, a plain copy there.
    """
    repo, rev = parse_ref(ref)
    commit, _ = resolve(ref)
    _warn_unpinned(ref, repo, rev, commit)
    with hub_errors(ref):
        if not offline():
            path = _hf(progress).snapshot_download(repo, revision=commit, allow_patterns=PATTERNS, local_dir=out,
                                                   cache_dir=cache_dir(), endpoint=endpoint())
            return Path(path), commit
        snapshot = _storage(repo) / "snapshots" / commit
        if not snapshot.is_dir():
            raise HubError(f"{ref}: HF_HUB_OFFLINE is set and it is not in the local cache",
                           hint="unset HF_HUB_OFFLINE to download it")
        if out is None:
            return snapshot, commit
        Path(out).mkdir(parents=True, exist_ok=True)
        for f in snapshot.iterdir():
            shutil.copy2(f, Path(out) / f.name)
        return Path(out), commit


def push(folder: str | Path, repo: str, *, private: bool = False, revision: str | None = None,
         message: str | None = None, progress: bool = True) -> str:
    """Upload a folder to `repo` (created if needed) with a model card; returns the commit URL."""
    from .provenance import write_hub_card

    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder}: no such folder to push", hint="pass the output folder of apply or a transform")
    check_repo_id(repo)
    write_hub_card(folder)
    with hub_errors(repo, pushing=True):
        api = _hf(progress).HfApi(endpoint=endpoint())
        api.create_repo(repo, private=private or None, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=folder, revision=revision,
                                 commit_message=message or f"Upload {folder.name} with paramdelta")
    return info.commit_url
