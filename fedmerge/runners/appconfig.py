"""The scenario as the Flower apps see it: from the run config (`flwr run`, also under `fedmerge simulate`).

Run-config keys (``[tool.flwr.app.config]`` in pyproject.toml, or ``flwr run . --run-config``): ``scenario``
(name or path), ``overrides`` (``;``-separated ``section.key=value`` items), ``out-dir`` (a relative path is
relative to the SuperLink's working folder: pass an absolute one), ``resume`` (re-merge from the client weights
saved in ``out-dir``) and ``overwrite`` (delete what an earlier run left in ``out-dir``; without it or ``resume`` a
non-empty ``out-dir`` is refused); ``out-dir-held`` is set by ``fedmerge simulate``, which holds ``out-dir`` (lock,
earlier files, resume archive) around the run itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedmerge.config import DEFAULT_SCENARIO, load_scenario
from fedmerge.scenario import Scenario

SCENARIO_KEY = "scenario"
OVERRIDES_KEY = "overrides"
OUT_DIR_KEY = "out-dir"
RESUME_KEY = "resume"
OVERWRITE_KEY = "overwrite"
HELD_KEY = "out-dir-held"


def scenario_from_run_config(run_config: Mapping[str, Any]) -> Scenario:
    """The resolved scenario named by the run config (default: quickstart)."""
    overrides = [item.strip() for item in str(run_config.get(OVERRIDES_KEY, "")).split(";") if item.strip()]
    return load_scenario(str(run_config.get(SCENARIO_KEY, "") or DEFAULT_SCENARIO), overrides)
