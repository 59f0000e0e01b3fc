"""Model families from outside the package: ``register_family`` in this process, the ``fedmerge.families``
entry-point group for every process."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import EntryPoint
from typing import ClassVar

import pytest
import torch

from fedmerge.cli import main
from fedmerge.config import load_scenario
from fedmerge.errors import FedmergeError
from fedmerge.models import FAMILIES, FAMILY_PLUGIN_GROUP, get_family, register_family
from fedmerge.models.text_lae import TextLAEFamily
from tests.test_merge_plugins import install_distribution


class TinyLAE(TextLAEFamily):
    """A family of one's own: here the text-space LAE under another name."""

    name: ClassVar[str] = "tiny-lae"


class Misnamed(TextLAEFamily):
    name: ClassVar[str] = "text-lae"  # not the name it is registered under


class NotAFamily:
    name: ClassVar[str] = "not-a-family"


class Unsplit(torch.nn.Module):
    """The text-space LAE's s = x E W Eᵀ with only a forward: MergeRec's default frozen item side cannot run it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.W = torch.nn.Parameter(torch.eye(dim))

    def forward(self, seqs: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        history = torch.zeros(seqs.shape[0], item_features.shape[0] + 1).scatter_(1, seqs + 1, 1.0)[:, 1:]
        return history @ item_features @ self.W @ item_features.T


class UnsplitLAE(TextLAEFamily):
    name: ClassVar[str] = "unsplit-lae"

    def build(self, dim: int) -> torch.nn.Module:
        return Unsplit(dim)


@pytest.fixture
def registered():
    register_family("tiny-lae", "tests.test_family_plugins:TinyLAE")
    yield "tiny-lae"
    FAMILIES.pop("tiny-lae", None)


def test_a_registered_family_runs_a_federation_and_its_saved_model_loads(registered, tmp_path):
    from fedmerge.recommender import load_recommender
    from fedmerge.runners.inprocess import run_inprocess

    cfg = load_scenario("quickstart", [
        "run.progress=false", "data.synthetic.n_users=30", "data.synthetic.n_items=20", "data.synthetic.max_len=6",
        'model.family="tiny-lae"', "model.params={lam = 10.0}", "baselines.fedavg_rounds=0", "baselines.joint=false",
        'merge.methods=["average", "mergerec_taskwise"]', "merge.mergerec.steps=3", "encoder.name=hashing",
        "encoder.params.dim=16", f"encoder.cache_dir={tmp_path / 'cache'}"])
    results = run_inprocess(cfg, tmp_path / "run")
    assert results["status"] == "ok" and results["config"]["model"]["family"] == "tiny-lae"
    assert set(results["models"]["average"]) >= {"synth-0", "synth-1", "synth-2"}
    model = load_recommender(tmp_path / "run" / "models" / "average.safetensors", cache_dir=tmp_path / "cache")
    assert isinstance(model.family, TinyLAE)
    assert model.evaluate(cfg.load_domain("synth-0"))["recall@10"] == results["models"]["average"]["synth-0"]["recall@10"]
    # and `fedmerge train` takes it as it takes a built-in family
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--domains", "1", "--users", "30", "--items", "20"]) == 0
    assert main(["train", "--data", str(data / "synth-0"), "--model", "tiny-lae", "--encoder", "hashing",
                 "--set", "lam=10.0", "--out", str(tmp_path / "train")]) == 0
    assert json.loads((tmp_path / "train" / "metrics.json").read_text())["model"] == "tiny-lae"


@pytest.mark.parametrize("name, target, message", [
    ("Bad Name", "m:C", r"model family name 'Bad Name'"),
    ("sequential", "m:C", r"model family 'sequential' is already registered"),
    ("ease", "m:C", r"model family 'ease' is already registered .*in-domain models"),
    ("mine", "no_class_given", r"model family 'mine': 'no_class_given' must be 'module:attribute'"),
    ("mine", "tests.no_such_module:Family", r"module 'tests.no_such_module' is not importable"),
])
def test_registration_refuses_what_could_not_be_built(name, target, message):
    with pytest.raises(ValueError, match=message):
        register_family(name, target)
    assert "mine" not in FAMILIES


def test_a_family_class_that_is_not_a_family_or_has_another_name_is_refused_when_built():
    for name, target in (("misnamed", "tests.test_family_plugins:Misnamed"),
                         ("not-a-family", "tests.test_family_plugins:NotAFamily")):
        register_family(name, target)
        try:
            with pytest.raises(FedmergeError, match=rf"model family '{name}' .* must be a ModelFamily subclass whose "
                                                    rf"name is '{name}'"):
                get_family(name)
        finally:
            FAMILIES.pop(name, None)
    register_family("typo", "tests.test_family_plugins:TinyLea")
    try:
        with pytest.raises(FedmergeError, match=r"model family 'typo': module 'tests.test_family_plugins' has no "
                                                r"attribute 'TinyLea'"):
            get_family("typo")
    finally:
        FAMILIES.pop("typo", None)


def test_entry_point_families_load_and_a_broken_one_is_named(monkeypatch):
    from fedmerge import plugins

    good = EntryPoint("tiny-lae", "tests.test_family_plugins:TinyLAE", FAMILY_PLUGIN_GROUP)
    malformed = EntryPoint("bad", "no_class_named", FAMILY_PLUGIN_GROUP)
    gone = EntryPoint("gone", "tests.no_such_module:Family", FAMILY_PLUGIN_GROUP)  # not imported until built
    monkeypatch.setattr(plugins, "entry_points",
                        lambda group: [good, malformed, gone] if group == FAMILY_PLUGIN_GROUP else [])
    monkeypatch.setattr(FAMILIES, "errors", {})
    monkeypatch.setattr(FAMILIES, "_loaded", False)
    monkeypatch.setattr(FAMILIES, "_everywhere", dict(FAMILIES._everywhere))  # what the fake entry points add, undone  # restored afterwards: the real entry points load later
    try:
        assert "tiny-lae" in FAMILIES  # the first lookup loads the group
        FAMILIES.load_plugins()  # a second load changes nothing (it recorded the loaded plugins as taken)
        assert isinstance(get_family("tiny-lae", lam=1.0), TinyLAE)
        assert set(FAMILIES.errors) == {"bad"}
        with pytest.raises(FedmergeError, match=r"unknown model family 'bad'.*plugin 'bad' .*failed to load"):
            get_family("bad")
        with pytest.raises(FedmergeError, match=r"model family 'gone': cannot import module 'tests.no_such_module' "
                                                r"\(ModuleNotFoundError"):
            get_family("gone")
    finally:
        FAMILIES.pop("tiny-lae", None)
        FAMILIES.pop("gone", None)


def test_an_installed_family_is_there_in_a_fresh_process_without_importing_torch_to_load_the_scenario(tmp_path):
    """A distribution with a fedmerge.families entry point (as `pip install` leaves it): a scenario naming the
    family loads (torch-free, as the Flower launcher loads it) and the family builds in any process."""
    env = install_distribution(tmp_path, "fm_family", {
        "__init__.py": "import torch\n",  # what a plugin package may well do
        "family.py": "from typing import ClassVar\nfrom fedmerge.models.text_lae import TextLAEFamily\n\n"
        "class MyFamily(TextLAEFamily):\n    name: ClassVar[str] = 'my-family'\n",
    }, FAMILY_PLUGIN_GROUP, {"my-family": "fm_family.family:MyFamily"})
    script = ("import json, sys\nfrom fedmerge.cli import main\nfrom fedmerge.config import load_scenario\n"
              "cfg = load_scenario('quickstart', ['model.family=\"my-family\"', 'model.params={lam = 5.0}'])\n"
              "import contextlib, io\n"
              "with contextlib.redirect_stdout(io.StringIO()) as shown, contextlib.suppress(SystemExit):\n"
              "    main(['train', '--help'])  # lists every family, the plugin's too\n"
              "assert 'my-family' in shown.getvalue()\n"
              "light = 'torch' not in sys.modules\n"
              "family = cfg.make_checked_family()\n"
              "print(json.dumps([light, type(family).__name__, family.config()]))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == [True, "MyFamily", {"lam": 5.0, "max_len": 50}]
    assert "left out" not in run.stderr


def test_a_family_mergerec_cannot_run_fails_before_any_client_trains(tmp_path):
    """MergeRec's frozen item side needs a split module: the run failed at the merge, after every client trained,
    without saying that item_side = "full" runs such a family."""
    from fedmerge.runners.inprocess import run_inprocess

    register_family("unsplit-lae", "tests.test_family_plugins:UnsplitLAE")
    try:
        overrides = ["run.progress=false", "data.synthetic.n_users=30", "data.synthetic.n_items=20",
                     'model.family="unsplit-lae"', "model.params={lam = 10.0}", "baselines.fedavg_rounds=0",
                     "baselines.joint=false", 'merge.methods=["average", "mergerec_taskwise"]',
                     "merge.mergerec.steps=2", "encoder.name=hashing", "encoder.params.dim=16",
                     f"encoder.cache_dir={tmp_path / 'cache'}"]
        with pytest.raises(FedmergeError, match=r"merge.mergerec: item_side='frozen' needs module methods .*set "
                                                r"merge.mergerec.item_side = \"full\""):
            run_inprocess(load_scenario("quickstart", overrides), tmp_path / "run")
        assert not (tmp_path / "run" / "clients").exists()  # no client trained
        full = run_inprocess(load_scenario("quickstart", [*overrides, 'merge.mergerec.item_side="full"']),
                             tmp_path / "full")
        assert full["status"] == "ok" and "mergerec_taskwise" in full["models"]
    finally:
        FAMILIES.pop("unsplit-lae", None)
