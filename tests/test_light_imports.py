"""The process that launches a Flower run stays light: validating scenarios and the launcher side of
``fedmerge simulate --engine flower`` import no torch (only the Flower server and client processes do)."""

from __future__ import annotations

import json
import subprocess
import sys

from fedmerge.merging import METHODS, methods
from tests.test_cli_output import HEAVY  # torch, Flower, Ray, transformers, matplotlib, scipy

# Every shipped scenario loaded, validated and written as `simulate` does for `flwr run` (a privacy study's scenario
# through load_study), the CLI parser built, the launcher modules imported, the progress bar constructed and the
# quickstart's domains loaded, also from own-data folders, with their file digests.
LAUNCHER = """
import json, sys, tempfile, tomllib
from pathlib import Path
from fedmerge.cli import build_parser
from fedmerge.config import SCENARIO_DIR, load_scenario, write_scenario
from fedmerge.privacy.study import STUDY_SECTION, load_study
from fedmerge.runners.run_progress import FolderProgress
import fedmerge.deploy.local, fedmerge.deploy.flwr_cli, fedmerge.runners.multiseed, fedmerge.runners.simulation

build_parser()
names = []
with tempfile.TemporaryDirectory() as tmp:
    for path in sorted(SCENARIO_DIR.glob("*.toml")):
        study = STUDY_SECTION in tomllib.loads(path.read_text())
        cfg = load_study(str(path))[0] if study else load_scenario(path)
        write_scenario(cfg, Path(tmp) / path.name)
        FolderProgress(cfg, Path(tmp), enabled=False).close()
        names.append(path.stem)
quickstart = load_scenario("quickstart")  # the Flower launcher loads every domain once before Flower starts
for name in quickstart.data.domain_names():
    quickstart.load_domain(name)
with tempfile.TemporaryDirectory() as tmp:  # and records the digests of a data source's files (own data here)
    from fedmerge.data import save_generic_domain
    for name in quickstart.data.domain_names():
        save_generic_domain(quickstart.load_domain(name), Path(tmp) / name)
    own = load_scenario("quickstart", ['data.source="generic"', f'data.root="{tmp}"',
                                       f'data.domains={quickstart.data.domain_names()!r}'.replace("'", '"')])
    for name in own.data.domain_names():
        own.load_domain(name)
    own.data.file_digests()
print(json.dumps({"scenarios": names, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def test_scenarios_and_the_flower_launcher_import_no_torch():
    out = subprocess.run([sys.executable, "-c", LAUNCHER], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert {"quickstart", "amazon-seq", "privacy-seq"} <= set(report["scenarios"])
    assert [m for m in HEAVY if m in report["modules"]] == []


def test_every_registered_method_names_a_tensor_function():
    assert all(callable(method.fn) and method.fn.__module__ == methods.__name__ for method in METHODS.values())
