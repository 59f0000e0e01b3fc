"""Merge methods from outside the package: ``register_method`` in this process, the ``fedmerge.merge_methods``
entry-point group for every process (the Flower ServerApp's too)."""

from __future__ import annotations

import math
from importlib.metadata import EntryPoint

import pytest
import torch

from fedmerge.config import apply_overrides, load_scenario
from fedmerge.errors import FedmergeError
from fedmerge.merging import METHODS, MergeMethod, Param, get_method, merge, register_method, resolve_params
from fedmerge.merging import registry


def half_sum(tau: torch.Tensor, params: dict, generator: torch.Generator) -> torch.Tensor:
    """τ̃_k = shrink · τ_k: the merge is θ₀ + scale · shrink · Σ τ_k."""
    return tau * params["shrink"]


HALF_SUM = MergeMethod(
    "half_sum", "tests.test_merge_plugins:half_sum",
    {"shrink": Param(0.5, lambda v: isinstance(v, float | int) and 0 < v <= 1, "a number in (0, 1]"),
     "scale": Param(1.0, lambda v: isinstance(v, float | int) and math.isfinite(v), "a finite number")},
    "https://example.org/half-sum", "a test method: shrunk task arithmetic",
)


@pytest.fixture
def registered():
    """HALF_SUM registered for one test, removed afterwards (METHODS is process-wide)."""
    register_method(HALF_SUM)
    yield HALF_SUM
    METHODS.pop(HALF_SUM.name, None)


def test_a_registered_method_merges_and_is_checked_like_a_built_in(registered):
    theta0 = {"w": torch.zeros(3), "b": torch.ones(2)}
    models = {"a": {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([2.0, 2.0])},
              "b": {"w": torch.tensor([3.0, 0.0, -1.0]), "b": torch.tensor([1.0, 0.0])}}
    merged = merge("half_sum", theta0, models, shrink=0.25, scale=2.0)
    assert torch.allclose(merged["w"], 0.5 * torch.tensor([4.0, 2.0, 2.0]))
    assert torch.allclose(merged["b"], torch.ones(2) + 0.5 * torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"half_sum.*shrink=2.*a number in \(0, 1\]"):
        resolve_params("half_sum", {"shrink": 2})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['density'\].*valid: \['scale', 'shrink'\]"):
        resolve_params("half_sum", {"density": 0.1})


def test_a_plugin_scale_left_none_is_one():
    """merge_scale read any None scale as DARE's and looked up params["base"]: KeyError: 'base'."""
    optional = MergeMethod("optional_scale", "tests.test_merge_plugins:half_sum",
                           {"shrink": Param(0.5, lambda v: 0 < v <= 1, "(0, 1]"),
                            "scale": Param(None, lambda v: v is None or math.isfinite(v), "None or a number")},
                           "https://example.org/optional", "a test method whose scale may be left unset")
    register_method(optional)
    try:
        merged = merge("optional_scale", {"w": torch.zeros(2)}, {"a": {"w": torch.ones(2)}, "b": {"w": torch.ones(2)}})
    finally:
        METHODS.pop("optional_scale", None)
    assert torch.equal(merged["w"], torch.ones(2))  # 1 · Σ 0.5 · τ_k


def test_a_scenario_names_a_registered_method_and_the_run_builds_it(registered, tmp_path):
    from fedmerge.runners.simulation import run_scenario

    cfg = load_scenario("quickstart", [
        "run.progress=false", "data.synthetic.n_domains=2", "data.synthetic.n_users=30", "data.synthetic.n_items=20",
        "data.synthetic.max_len=6", "model.params.hidden=8", "model.params.n_layers=1", "model.params.max_len=6",
        "model.params.max_epochs=1", "baselines.fedavg_rounds=0", "baselines.joint=false", "encoder.name=hashing",
        "encoder.params.dim=16", f"encoder.cache_dir={tmp_path / 'cache'}",
        'merge.methods=["task_arithmetic","half_sum"]', "merge.params.half_sum.shrink=0.3"])
    results = run_scenario(cfg, "inprocess", tmp_path / "run")
    assert set(results["models"]["half_sum"]) == {"synth-0", "synth-1", "average"}
    with pytest.raises(FedmergeError, match=r"merge.params.half_sum: .*shrink=5"):
        apply_overrides(cfg, ["merge.params.half_sum.shrink=5"])


@pytest.mark.parametrize("method, message", [
    (MergeMethod("ties", "x:y", {}, "", "", scale_param=None), r"'ties' is already registered"),
    (MergeMethod("bad_kernel", "no_module_path", {}, "", ""), r"merge method 'bad_kernel': 'no_module_path' must be 'module:attribute'"),
    (MergeMethod("bad_param", "m:f", {"k": 3}, "", ""), r"parameter 'k'.*Param"),
    (MergeMethod("bad_default", "m:f", {"k": Param(-1, lambda v: v > 0, "> 0")}, "", ""), r"default -1.*> 0"),
    (MergeMethod("bad_scale", "m:f", {}, "", ""), r"scale_param 'scale' is not one of its parameters"),
    (MergeMethod("Bad Name", "m:f", {}, "", "", scale_param=None), r"name 'Bad Name'"),
    # names the runner gives its own rows and models: a plugin there would be overwritten or never run
    (MergeMethod("fedavg", "m:f", {}, "", "", scale_param=None), r"'fedavg' is reserved"),
    (MergeMethod("theta0", "m:f", {}, "", "", scale_param=None), r"'theta0' is reserved"),
    (MergeMethod("mergerec_fast", "m:f", {}, "", "", scale_param=None), r"'mergerec_fast' is reserved"),
    (MergeMethod("individual_x", "m:f", {}, "", "", scale_param=None), r"'individual_x' is reserved"),
    # a kernel module that does not exist failed the run only after every client trained
    (MergeMethod("typo_function", "tests.test_merge_plugins:half_summ", {}, "", "", scale_param=None),
     r"module 'tests.test_merge_plugins' has no function 'half_summ'"),
    (MergeMethod("typo_module", "tests.no_such_module:f", {}, "", "", scale_param=None),
     r"merge method 'typo_module': module 'tests.no_such_module' is not importable"),
])
def test_registration_refuses_what_could_not_run(method, message):
    with pytest.raises(ValueError, match=message):
        register_method(method)
    assert method.name == "ties" or method.name not in METHODS


def test_entry_point_plugins_load_and_a_broken_one_is_named(monkeypatch):
    from fedmerge import plugins

    good = EntryPoint("half_sum", "tests.test_merge_plugins:HALF_SUM", registry.PLUGIN_GROUP)
    broken = EntryPoint("missing", "tests.no_such_module:METHOD", registry.PLUGIN_GROUP)
    wrong = EntryPoint("wrong", "tests.test_merge_plugins:half_sum", registry.PLUGIN_GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [good, broken, wrong] if group == registry.PLUGIN_GROUP else [])
    monkeypatch.setattr(METHODS, "errors", {})
    monkeypatch.setattr(METHODS, "_loaded", False)
    monkeypatch.setattr(METHODS, "_everywhere", dict(METHODS._everywhere))  # what the fake entry points add, undone
    try:
        METHODS.load_plugins()
        assert get_method("half_sum") is HALF_SUM
        assert set(METHODS.errors) == {"missing", "wrong"}
        assert "MergeMethod" in METHODS.errors["wrong"]
        with pytest.raises(ValueError, match=r"unknown merge method 'missing'.*plugin 'missing' .*failed to load"):
            get_method("missing")
    finally:
        METHODS.pop("half_sum", None)


def install_distribution(root, package: str, files: dict[str, str], group: str, entries: dict[str, str]) -> dict:
    """``package`` (its ``files``) and a ``.dist-info`` declaring ``entries`` (name -> "module:attribute") in the
    entry-point ``group``, under ``root`` as `pip install` leaves them; returns an environment with ``root`` on
    PYTHONPATH, for a fresh interpreter that finds them."""
    import os

    (root / package).mkdir()
    for name, text in files.items():
        (root / package / name).write_text(text)
    info = root / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{n} = {v}\n" for n, v in entries.items()))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


def test_an_installed_plugin_is_there_when_fedmerge_is_imported(tmp_path):
    """A distribution on the path with a fedmerge.merge_methods entry point (as `pip install` leaves it) whose
    module imports MergeMethod from fedmerge.merging: loading it while that package was importing failed (circular
    import), so the method was missing in every process."""
    import json
    import subprocess
    import sys

    env = install_distribution(tmp_path, "fm_plugin", {
        "__init__.py": "from fedmerge.merging import MergeMethod, Param\n"
        "SHRUNK = MergeMethod('shrunk_sum', 'fm_plugin.kernel:shrunk', {'shrink': Param(0.5, lambda v: 0 < v <= 1, "
        "'(0, 1]')}, 'https://example.org', 'shrunk task arithmetic', scale_param=None)\n",
        "kernel.py": "def shrunk(tau, params, generator):\n    return tau * params['shrink']\n",
    }, registry.PLUGIN_GROUP, {"shrunk_sum": "fm_plugin:SHRUNK"})
    script = ("import json, torch\nfrom fedmerge.config import load_scenario\nfrom fedmerge.merging import merge\n"
              "cfg = load_scenario('quickstart', ['merge.methods=[\"shrunk_sum\"]', 'merge.params.shrunk_sum.shrink=0.25'])\n"
              "out = merge('shrunk_sum', {'w': torch.zeros(2)}, {'a': {'w': torch.ones(2)}, 'b': {'w': torch.ones(2)}},"
              " **cfg.merge.params['shrunk_sum'])\nprint(json.dumps(out['w'].tolist()))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == [0.5, 0.5] and "left out" not in run.stderr
    # the plugin's own package imported first (a notebook, its tests): it imports fedmerge.merging half-way through
    # its own import, which then loaded the entry point from the half-initialised package and left it out
    first = "import fm_plugin\nfrom fedmerge.merging import METHODS\nprint('shrunk_sum' in METHODS)\n"
    run = subprocess.run([sys.executable, "-c", first], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "True" and "left out" not in run.stderr, run.stderr[-2000:]


def test_a_kernel_function_that_does_not_exist_is_a_clear_error(registered):
    typo = MergeMethod("half_typo", "tests.test_merge_plugins:no_such_fn", {}, "", "", scale_param=None)
    with pytest.raises(ValueError, match=r"has no function 'no_such_fn'"):  # its module is imported: checked now
        register_method(typo)
    METHODS["half_typo"] = typo  # as registered before its module was imported: the merge names the function
    try:
        with pytest.raises(ValueError, match=r"half_typo.*'tests.test_merge_plugins:no_such_fn'.*no_such_fn"):
            merge("half_typo", {"w": torch.zeros(1)}, {"a": {"w": torch.ones(1)}})
    finally:
        METHODS.pop("half_typo", None)


def broken_kernel(tau: torch.Tensor, params: dict, generator: torch.Generator) -> torch.Tensor:
    raise RuntimeError("the plugin's own bug")


def test_a_plugin_kernel_that_fails_costs_only_its_own_merge(tmp_path):
    """A plugin's kernel raising (its bug, or a typo'd function name) failed the whole run after every client
    trained; a built-in merge's failure still fails it (that is fedmerge's bug)."""
    from fedmerge.runners.simulation import run_scenario

    register_method(MergeMethod("boom", "tests.test_merge_plugins:broken_kernel", {}, "", "", scale_param=None))
    try:
        cfg = load_scenario("quickstart", [
            "run.progress=false", "data.synthetic.n_domains=2", "data.synthetic.n_users=30",
            "data.synthetic.n_items=20", "data.synthetic.max_len=6", "model.params.hidden=8", "model.params.n_layers=1",
            "model.params.max_len=6", "model.params.max_epochs=1", "baselines.fedavg_rounds=0",
            "baselines.joint=false", "encoder.name=hashing", "encoder.params.dim=16",
            f"encoder.cache_dir={tmp_path / 'cache'}", 'merge.methods=["average","boom"]'])
        results = run_scenario(cfg, "inprocess", tmp_path / "run")
    finally:
        METHODS.pop("boom", None)
    assert results["status"] == "ok" and "average" in results["models"] and "boom" not in results["models"]
    assert "RuntimeError: the plugin's own bug" in results["merge_report"]["failed"]["boom"]


def test_a_method_registered_in_this_process_only_is_refused_by_the_flower_engine_before_it_starts(registered, tmp_path):
    """The Flower engine's server runs in another process, which did not have the method: the run failed there with
    "unknown method" although the scenario had just validated here."""
    from fedmerge.runners.simulation import run_scenario

    cfg = load_scenario("quickstart", ['merge.methods=["task_arithmetic","half_sum"]'])
    with pytest.raises(FedmergeError, match=r"\['half_sum'\] registered in this process only .*engine='inprocess', or "
                                            r"register them with an entry point"):
        run_scenario(cfg, "flower", tmp_path / "run")
    assert "half_sum" in METHODS.registered_here and "ties" not in METHODS.registered_here
    assert not (tmp_path / "run").exists()


def test_only_registrations_count_as_this_process_only_and_mergerecs_init_method_is_checked(registered, monkeypatch):
    """Putting a built-in back (a test's monkeypatch undone) marked it as registered here, so every Flower run was
    refused; a MergeRec initialised from a method registered here passed the check and failed in the server."""
    from fedmerge.runners.simulation import check_registered_here_only

    ties = METHODS.pop("ties")
    METHODS["ties"] = ties
    assert "ties" not in METHODS.registered_here and "half_sum" in METHODS.registered_here
    check_registered_here_only(load_scenario("quickstart"))
    cfg = load_scenario("quickstart", ['merge.methods=["mergerec_taskwise"]', 'merge.mergerec.init_method="half_sum"'])
    with pytest.raises(FedmergeError, match=r"\['half_sum'\] registered in this process only"):
        check_registered_here_only(cfg)


def test_a_module_may_register_its_kernels_while_it_is_being_imported(tmp_path, monkeypatch):
    """Decorator-style registration runs before the function's name is bound in its module: the function check must
    wait for modules that are still importing."""
    import importlib
    import sys

    (tmp_path / "decoplug.py").write_text(
        "from fedmerge.merging import MergeMethod, register_method\n"
        "def merge_method(fn):\n"
        "    register_method(MergeMethod(fn.__name__, f'{fn.__module__}:{fn.__name__}', {}, '', '', scale_param=None))\n"
        "    return fn\n"
        "@merge_method\n"
        "def deco_mean(tau, params, generator):\n"
        "    return tau / tau.shape[0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module("decoplug")
        assert get_method("deco_mean").fn is sys.modules["decoplug"].deco_mean
    finally:
        METHODS.pop("deco_mean", None)
        sys.modules.pop("decoplug", None)


def test_what_this_process_changed_is_registered_here_whatever_the_route(registered):
    """Put back by hand after a pop, or a built-in replaced under its name: only this process has that entry."""
    METHODS.pop("half_sum")
    METHODS["half_sum"] = HALF_SUM
    assert "half_sum" in METHODS.registered_here
    ties = METHODS["ties"]
    try:
        METHODS["ties"] = HALF_SUM  # another kernel under a built-in's name: the Flower processes would run ties
        assert "ties" in METHODS.registered_here
    finally:
        METHODS["ties"] = ties
    assert "ties" not in METHODS.registered_here


def test_a_plugin_that_replaces_a_built_in_while_loading_is_left_out_and_named(tmp_path, monkeypatch, caplog):
    """A plugin module assigning METHODS["ties"] (or another registry's built-in, FAMILIES["sequential"]) while its
    entry point loaded was recorded as what every process has: `ties` ran its kernel everywhere, with no warning."""
    import sys

    from fedmerge import plugins
    from fedmerge.models import FAMILIES

    (tmp_path / "evilplug.py").write_text(
        "from fedmerge.merging import METHODS, MergeMethod\n"
        "from fedmerge.models import FAMILIES\n"
        "def zero(tau, params, generator):\n"
        "    return tau * 0\n"
        "METHODS['ties'] = MergeMethod('ties', 'evilplug:zero', {}, '', 'not ties', scale_param=None)\n"
        "FAMILIES['sequential'] = 'evilplug:Family'\n"
        "FAMILIES['evilfam'] = 'evilplug:Family'\n"
        "NICE = MergeMethod('nice_sum', 'evilplug:zero', {}, '', 'a plugin', scale_param=None)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ties, sequential = METHODS["ties"], FAMILIES["sequential"]  # (both registries loaded: the fake reaches only one)
    entry = EntryPoint("nice_sum", "evilplug:NICE", registry.PLUGIN_GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [entry] if group == registry.PLUGIN_GROUP else [])
    monkeypatch.setattr(METHODS, "errors", {})
    monkeypatch.setattr(METHODS, "_loaded", False)
    monkeypatch.setattr(METHODS, "_everywhere", dict(METHODS._everywhere))
    try:
        METHODS.load_plugins()
        assert METHODS["ties"] is ties and FAMILIES["sequential"] == sequential
        assert "nice_sum" not in METHODS and "evilfam" not in FAMILIES  # what it registered anywhere is left out
        assert "ties" not in METHODS.registered_here and "sequential" not in FAMILIES.registered_here
        assert "merge-method 'ties'" in METHODS.errors["nice_sum"]
        assert "model-family 'sequential'" in METHODS.errors["nice_sum"]
        assert "plugin 'nice_sum' (evilplug:NICE) left out" in caplog.text and "ERROR" in caplog.text.upper()
        with pytest.raises(ValueError, match=r"plugin 'nice_sum' .*replaced or removed"):
            get_method("nice_sum")
    finally:
        METHODS["ties"], FAMILIES["sequential"] = ties, sequential
        METHODS.pop("nice_sum", None)
        FAMILIES.pop("evilfam", None)
        sys.modules.pop("evilplug", None)
