"""The scenario as the Flower apps see it: from the run config (`flwr run`, also under `fedmerge simulate`).

Run-config keys (``[tool.flwr.app.config]`` in pyproject.toml, or ``flwr run . --run-config``): ``scenario``
(name or path), ``overrides`` (``;``-separated ``section.key=value`` items), ``out-dir`` (a relative path is
relative to the SuperLink's working folder: pass an absolute one), ``resume`` (re-merge from the client weights
saved in ``out-dir``) and ``overwrite`` (delete what an earlier run left in ``out-dir``; without it or ``resume`` a
non-empty ``out-dir`` is refused; booleans, given unquoted: :func:`folder_settings`); ``out-dir-held`` is set by ``fedmerge simulate``, which holds ``out-dir`` (lock,
earlier files, resume archive) around the run itself; ``source-commit`` and ``source-digest`` are the launcher's
(:func:`fedmerge.provenance.source_commit`, :func:`~fedmerge.provenance.source_digest`), for the results' versions of
a ServerApp that runs from the app bundle, outside any checkout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmerge.config import DEFAULT_SCENARIO, load_scenario, write_scenario
from fedmerge.errors import FedmergeError
from fedmerge.provenance import source_commit, source_digest
from fedmerge.scenario import Scenario

SCENARIO_KEY = "scenario"
OVERRIDES_KEY = "overrides"
OUT_DIR_KEY = "out-dir"
RESUME_KEY = "resume"
OVERWRITE_KEY = "overwrite"
HELD_KEY = "out-dir-held"
SOURCE_COMMIT_KEY = "source-commit"
SOURCE_DIGEST_KEY = "source-digest"
SCENARIO_FILE = "scenario.toml"  # the resolved scenario :func:`flower_run_config` writes for the apps


def flower_run_config(
    cfg: Scenario, folder: Path, out_dir: Path, *, resume: bool = False, out_dir_held: bool = False
) -> dict[str, Any]:
    """The run config that hands the resolved ``cfg`` to ``flwr run`` (simulation and deployment alike): ``cfg``
    written to ``folder/scenario.toml`` (:func:`fedmerge.config.write_scenario`) as ``scenario``, no overrides,
    ``out-dir``, ``resume``, ``out-dir-held`` and this process's source commit and digest."""
    return {SCENARIO_KEY: str(write_scenario(cfg, folder / SCENARIO_FILE)), OVERRIDES_KEY: "",
            OUT_DIR_KEY: str(out_dir), RESUME_KEY: resume, HELD_KEY: out_dir_held,
            SOURCE_COMMIT_KEY: source_commit(), SOURCE_DIGEST_KEY: source_digest()}


def launcher_source(run_config: Mapping[str, Any]) -> tuple[str, str] | None:
    """The launcher's (source commit, source digest) from the run config; None when a plain ``flwr run`` set none."""
    commit, digest = run_config.get(SOURCE_COMMIT_KEY), run_config.get(SOURCE_DIGEST_KEY)
    return (str(commit), str(digest)) if commit and digest else None


def scenario_from_run_config(run_config: Mapping[str, Any]) -> Scenario:
    """The resolved scenario named by the run config (default: quickstart)."""
    overrides = [item.strip() for item in str(run_config.get(OVERRIDES_KEY, "")).split(";") if item.strip()]
    return load_scenario(str(run_config.get(SCENARIO_KEY, "") or DEFAULT_SCENARIO), overrides)


@dataclass(frozen=True)
class FolderSettings:
    """Where the ServerApp writes and how it treats what is there (run-config keys ``out-dir``, ``resume``,
    ``overwrite``, ``out-dir-held``); ``target`` is None when ``out-dir`` is unset (the scenario's run name decides)."""

    target: Path | None
    resume: bool
    overwrite: bool
    held: bool


def run_config_flag(run_config: Mapping[str, Any], key: str) -> bool:
    """Boolean run-config ``key`` (absent: False); FedmergeError for anything but a boolean. Flower checks the keys
    of ``--run-config``, not their types: ``overwrite="false"`` arrives as a string, which ``bool()`` reads as true
    (it emptied an earlier run's folder)."""
    value = run_config.get(key, False)
    if not isinstance(value, bool):
        raise FedmergeError(f"run config {key} = {value!r} is not a boolean; give true or false without quotes")
    return value


def folder_settings(run_config: Mapping[str, Any]) -> FolderSettings:
    """The output folder's settings from the run config, every flag checked (:func:`run_config_flag`)."""
    out_dir = run_config.get(OUT_DIR_KEY, "")
    if not isinstance(out_dir, str):
        raise FedmergeError(f"run config {OUT_DIR_KEY} = {out_dir!r} is not a path; give it quoted")
    return FolderSettings(target=Path(out_dir) if out_dir else None, resume=run_config_flag(run_config, RESUME_KEY),
                          overwrite=run_config_flag(run_config, OVERWRITE_KEY),
                          held=run_config_flag(run_config, HELD_KEY))
