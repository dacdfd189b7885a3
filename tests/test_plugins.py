"""The plugin door: discovery through entry points, its error cases, the CLI, and `cast` end to end.

Third-party plugins are simulated the way pip would install them: a `NAME-0.1.dist-info` folder
(METADATA + entry_points.txt) and a module, both in a temporary folder put on sys.path. The
registry's `functools.cache`s are cleared around every test so each one sees exactly the
distributions it installed. Checkpoints are 2-layer llama models saved in several shards.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tinymodels import INDEX_NAME, load_state, make_checkpoint, train_tiny_tokenizer
from transformers import AutoModelForCausalLM

from paramdelta import plugins
from paramdelta.plugins import PluginError

INT_TENSOR = "model.layers.0.mlp.step_count"  # a non-float tensor whose name matches `--only mlp`


# -- world --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_src(tmp_path_factory) -> Path:
    """One bf16 llama checkpoint with a tokenizer, in several shards."""
    root = tmp_path_factory.mktemp("model")
    tok = train_tiny_tokenizer(root / "tokenizer")
    return make_checkpoint(root / "base", "llama", tokenizer=tok, dtype=torch.bfloat16)


@pytest.fixture
def model(model_src, tmp_path) -> Path:
    return Path(shutil.copytree(model_src, tmp_path / "in"))


@pytest.fixture
def model_with_int(model) -> Path:
    """`model` plus an int64 tensor in an extra shard, listed in the index."""
    save_file({INT_TENSOR: torch.arange(6, dtype=torch.int64).reshape(2, 3)}, model / "extra.safetensors",
              metadata={"format": "pt"})
    index = json.loads((model / INDEX_NAME).read_text())
    index["weight_map"][INT_TENSOR] = "extra.safetensors"
    (model / INDEX_NAME).write_text(json.dumps(index))
    return model


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    """Each test discovers plugins from scratch, and leaves no cached fake plugin behind."""
    monkeypatch.setenv("PDELTA_NO_PROGRESS", "1")
    monkeypatch.delenv("PDELTA_DEBUG", raising=False)
    plugins._entry_points.cache_clear()
    plugins.get.cache_clear()
    yield
    plugins._entry_points.cache_clear()
    plugins.get.cache_clear()


@pytest.fixture
def install(tmp_path, monkeypatch):
    """install(dist, entry_points={name: "module:attr"}, modules={module: source}) -> site folder.

    Writes a dist-info and the modules into a fresh folder on sys.path, as pip would.
    """
    imported: list[str] = []

    def run(dist: str, eps: dict[str, str], modules: dict[str, str] | None = None) -> Path:
        site = tmp_path / f"site-{dist}"
        info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        lines = [f"{k} = {v}" for k, v in eps.items()]
        (info / "entry_points.txt").write_text("[paramdelta.transforms]\n" + "\n".join(lines) + "\n")
        for mod, source in (modules or {}).items():
            (site / f"{mod}.py").write_text(textwrap.dedent(source))
            imported.append(mod)
        monkeypatch.syspath_prepend(str(site))
        plugins._entry_points.cache_clear()
        plugins.get.cache_clear()
        return site

    yield run
    for mod in imported:
        sys.modules.pop(mod, None)


SCALE_PLUGIN = '''
    """A third-party transform: multiply every float tensor by a factor."""
    from dataclasses import dataclass, field

    from paramdelta.plugins import TransformPlan
    from paramdelta.writer import OutTensor

    LOADED = []


    @dataclass(frozen=True, kw_only=True)
    class ScaleOptions:
        factor: float = field(default=2.0, metadata={"help": "Multiply float tensors by this."})


    class ScaleTransform:
        name = "scale"
        Options = ScaleOptions
        needs = frozenset()

        def check(self, ckpt, options):
            return TransformPlan([OutTensor(n, t.dtype, t.shape) for n, t in ckpt.tensors.items()],
                                 [f"scaled by {options.factor}"])

        def update_config(self, config, options):
            config["scaled_by"] = options.factor
            return config

        def apply(self, ckpt, options):
            for n, t in ckpt.tensors.items():
                x = ckpt.read(n)
                yield n, ((x.float() * options.factor).to(x.dtype) if t.is_float else x.clone())

        def load_model(self, path):
            from transformers import AutoModelForCausalLM

            LOADED.append(str(path))
            return AutoModelForCausalLM.from_pretrained(path)
'''


# -- running the CLI ------------------------------------------------------------------------------


def one_error_line(code: int, err: str) -> str:
    """The CLI's error contract: exit 2, one `error:` line on stderr, no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert code == 2, f"exit code {code}: {err}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def shard_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def no_output_left(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    assert not list(out.parent.glob(f".{out.name}.pdelta-tmp-*")), "a temporary folder was left behind"


# -- discovery ------------------------------------------------------------------------------------
def test_cast_is_found_through_the_installed_entry_points():
    declared = {ep.name: ep for ep in entry_points(group=plugins.GROUP)}
    assert declared["cast"].value == "paramdelta.builtin.cast:CastTransform"
    assert declared["cast"].dist.name == "paramdelta"
    info = plugins.available()["cast"]
    assert (info.name, info.target, info.package) == ("cast", "paramdelta.builtin.cast:CastTransform", "paramdelta")
    cast = plugins.get("cast")
    assert isinstance(cast, plugins.Transform)
    assert cast.name == "cast" and cast.needs == frozenset()


def test_two_packages_claiming_one_name_is_an_error(install, cli, model, tmp_path):
    install("fake-pkg", {"cast": "fake_cast:CastTransform"})
    with pytest.raises(PluginError) as err:
        plugins.available()
    msg = str(err.value)
    assert "'cast'" in msg and "paramdelta.builtin.cast:CastTransform" in msg and "fake_cast:CastTransform" in msg
    assert "uninstall" in msg
    line = one_error_line(*cli("plugins", "list")[::2])
    assert "two plugins claim the transform name 'cast'" in line
    out = tmp_path / "out"
    line = one_error_line(*cli("transform", "cast", "--in", model, "--out", out)[::2])
    assert "fake_cast:CastTransform" in line
    no_output_left(out)


def test_the_same_entry_point_seen_twice_is_not_a_duplicate(install):
    """One package visible twice (say, editable and installed) declares the same target: no conflict."""
    install("paramdelta-copy", {"cast": "paramdelta.builtin.cast:CastTransform"})
    assert plugins.available()["cast"].target == "paramdelta.builtin.cast:CastTransform"
    assert plugins.get("cast").name == "cast"


def test_third_party_transform_is_discovered_lazily_and_runs_end_to_end(install, cli, model, tmp_path):
    install("pdelta-scale", {"scale": "pdelta_scale:ScaleTransform"}, {"pdelta_scale": SCALE_PLUGIN})
    info = plugins.available()["scale"]
    assert (info.package, info.version, info.target) == ("pdelta-scale", "0.1", "pdelta_scale:ScaleTransform")
    assert "pdelta_scale" not in sys.modules, "listing the registry imported the plugin"

    code, out, err = cli("plugins", "list", "--format", "json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)["transforms"]}
    assert {"cast", "scale"} <= set(rows)  # other installed plugins may be listed too
    assert rows["scale"]["options"] == ["--factor"] and rows["scale"]["package"] == "pdelta-scale"

    dst = tmp_path / "scaled"
    code, out, err = cli("transform", "scale", "--in", model, "--out", dst, "--factor", "0.5",
                         "--max-shard-size", "20KB")
    assert code == 0, err
    assert f"wrote {dst}" in out and "note: scaled by 0.5" in out
    assert len(shard_files(dst)) > 1
    src, got = load_state(model), load_state(dst)
    assert got.keys() == src.keys()
    for name, t in src.items():
        assert got[name].dtype == t.dtype
        torch.testing.assert_close(got[name], (t.float() * 0.5).to(t.dtype), rtol=0, atol=0, msg=name)
    config = json.loads((dst / "config.json").read_text())
    assert config["scaled_by"] == 0.5
    assert config["paramdelta"] == {"transform": "scale", "options": {"factor": 0.5}}
    assert plugins.transform_of(dst) == "scale"
    for f in shard_files(dst):
        with safe_open(f, "pt") as s:
            assert s.metadata()["pdelta_transform"] == "scale"

    # A plugin's own loader is used for what it made.
    loaded, tok = plugins.load_model(dst)
    assert sys.modules["pdelta_scale"].LOADED == [str(dst)]
    assert tok is not None and next(loaded.parameters()).dtype == torch.bfloat16


def test_unknown_transform_names_suggest_close_ones(cli, model, tmp_path):
    with pytest.raises(PluginError) as err:
        plugins.get("cats")
    assert err.value.hint == "did you mean 'cast'?"
    with pytest.raises(PluginError) as err:
        plugins.get("zzzzzz")
    assert "cast" in err.value.hint and "pdelta plugins list" in err.value.hint

    out = tmp_path / "out"
    line = one_error_line(*cli("transform", "cats", "--in", model, "--out", out, "--dtype", "float16")[::2])
    assert "unknown transform 'cats'" in line and "did you mean 'cast'?" in line
    no_output_left(out)
    line = one_error_line(*cli("plugins", "info", "cats")[::2])
    assert "did you mean 'cast'?" in line


BROKEN = {
    "no apply()": ("""
        class Broken:
            name = "broken"
            Options = dict
            needs = frozenset()
            def check(self, ckpt, options): ...
            def update_config(self, config, options): ...
        """, "is not a valid transform"),
    "wrong name": ("""
        class Broken:
            name = "something-else"
            Options = dict
            needs = frozenset()
            def check(self, ckpt, options): ...
            def update_config(self, config, options): ...
            def apply(self, ckpt, options): ...
        """, "is not a valid transform"),
    "not a transform at all": ("Broken = 42\n", "is not a valid transform"),
    "unknown needs": ("""
        class Broken:
            name = "broken"
            Options = dict
            needs = frozenset({"quantum"})
            def check(self, ckpt, options): ...
            def update_config(self, config, options): ...
            def apply(self, ckpt, options): ...
        """, "declares unknown needs ['quantum']"),
    "import fails": ("raise ImportError('needs libfoo')\n", "failed to import: ImportError: needs libfoo"),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_an_invalid_plugin_is_a_clear_plugin_error(case, install, cli):
    source, expected = BROKEN[case]
    install("pdelta-broken", {"broken": "pdelta_broken:Broken"}, {"pdelta_broken": source})
    assert "broken" in plugins.available()  # listing from metadata still works
    with pytest.raises(PluginError) as err:
        plugins.get("broken")
    assert "'broken'" in str(err.value) and expected in str(err.value)
    assert err.value.hint
    line = one_error_line(*cli("plugins", "info", "broken")[::2])
    assert expected in line and "(fix: " in line


# -- the plugins commands ---------------------------------------------------------------------------
def test_plugins_list_text_and_json(cli):
    code, out, err = cli("plugins", "list")
    assert code == 0, err
    [line] = [ln for ln in out.splitlines() if ln.startswith("cast ")]
    assert "paramdelta" in line and "--dtype --only" in line
    code, out, err = cli("plugins", "list", "--format", "json")
    assert code == 0, err
    [row] = [r for r in json.loads(out)["transforms"] if r["name"] == "cast"]
    assert row["package"] == "paramdelta" and row["needs"] == [] and row["options"] == ["--dtype", "--only"]


def test_plugins_info_cast_text_and_json(cli):
    code, out, err = cli("plugins", "info", "cast")
    assert code == 0, err
    assert out.startswith("cast (paramdelta ")
    assert "paramdelta.builtin.cast:CastTransform" in out and "needs: none" in out
    [dtype_line] = [ln for ln in out.splitlines() if ln.strip().startswith("--dtype")]
    assert "bfloat16|float16|float32" in dtype_line and "'bfloat16'" in dtype_line and "Target dtype" in dtype_line
    code, out, err = cli("plugins", "info", "cast", "--format", "json")
    assert code == 0, err
    info = json.loads(out)
    assert info["name"] == "cast" and info["target"] == "paramdelta.builtin.cast:CastTransform"
    opts = {o["key"]: o for o in info["options"]}
    assert opts["dtype"]["flag"] == "--dtype" and opts["dtype"]["default"] == "'bfloat16'"
    assert opts["only"]["default"] == "None" and "Regex" in opts["only"]["help"]


# -- cast end to end --------------------------------------------------------------------------------
def test_cast_everything_to_float16_loads_with_transformers(cli, model, tmp_path):
    out = tmp_path / "fp16"
    code, stdout, err = cli("transform", "cast", "--in", model, "--out", out, "--dtype", "float16",
                            "--max-shard-size", "20KB")
    assert code == 0, err
    assert "21 of 21 tensors cast to float16" in stdout
    files = shard_files(out)
    assert len(files) > 1
    src, got = load_state(model), load_state(out)
    assert got.keys() == src.keys()
    for name, t in src.items():
        assert got[name].dtype == torch.float16, name
        assert torch.equal(got[name], t.to(torch.float16)), name

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16" and "torch_dtype" not in config
    assert config["paramdelta"] == {"transform": "cast", "options": {"dtype": "float16", "only": None}}
    for f in files:
        with safe_open(f, "pt") as s:
            meta = s.metadata()
        assert meta["pdelta_transform"] == "cast" and meta["pdelta_kind"] == "transform"
        assert json.loads(meta["pdelta_options"]) == {"dtype": "float16", "only": None}
        assert json.loads(meta["pdelta_inputs"])[0]["path"] == str(model.resolve())
    assert (out / "tokenizer.json").is_file()

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    for name, p in loaded.state_dict().items():
        assert torch.equal(p, got[name]), name


def test_cast_only_matching_names_leaves_the_rest_and_non_floats_alone(cli, model_with_int, tmp_path):
    out = tmp_path / "mlp16"
    code, stdout, err = cli("transform", "cast", "--in", model_with_int, "--out", out, "--dtype", "float16",
                            "--only", "mlp", "--max-shard-size", "20KB")
    assert code == 0, err
    src, got = load_state(model_with_int), load_state(out)
    assert got.keys() == src.keys()
    mlp = [n for n in src if "mlp" in n and src[n].is_floating_point()]
    assert len(mlp) == 6
    assert f"{len(mlp)} of {len(src)} tensors cast to float16" in stdout
    for name, t in src.items():
        if name in mlp:
            assert got[name].dtype == torch.float16 and torch.equal(got[name], t.to(torch.float16)), name
        else:
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert got[INT_TENSOR].dtype == torch.int64
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"  # a partial cast keeps the model's dtype
    assert config["paramdelta"]["options"] == {"dtype": "float16", "only": "mlp"}


@pytest.mark.parametrize(("args", "expected"), [
    (["--dtyp", "float16"], ["unknown option --dtyp", "did you mean '--dtype'?"]),
    (["--dtype", "float8"], ["dtype must be one of bfloat16, float16, float32", "'float8'"]),
    (["--only", "mlp[("], ["--only 'mlp[('", "not a valid regex"]),
    (["--only", "no_such_tensor"], ["matches no tensor", "pdelta inspect"]),
    (["--dtype"], ["--dtype needs a value"]),
    (["float16"], ["unexpected argument 'float16'"]),
], ids=["unknown-flag", "bad-dtype", "invalid-regex", "regex-matches-nothing", "missing-value", "positional"])
def test_bad_cast_options_are_clean_errors_and_write_nothing(args, expected, cli, model, tmp_path):
    out = tmp_path / "out"
    line = one_error_line(*cli("transform", "cast", "--in", model, "--out", out, *args)[::2])
    for text in expected:
        assert text in line, line
    assert line.startswith("error: cast: ")
    no_output_left(out)
