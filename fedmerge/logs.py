"""What a run prints: by default progress bars, warnings and errors, and the summary; ``--verbose`` adds every
framework's log (fedmerge INFO, Flower, alembic, Ray worker output); ``--debug`` adds DEBUG logs and tracebacks."""

from __future__ import annotations

import logging
import os
import warnings

FORMAT = "%(levelname)s %(name)s: %(message)s"
# Loggers of the frameworks under a Flower simulation: quiet unless --verbose. Flower's own (deprecation) warnings
# go to ERROR too: they address Flower's API users, not someone running a scenario.
FRAMEWORK_LOGGERS = {"flwr": logging.ERROR, "alembic": logging.WARNING, "ray": logging.WARNING}
LEVEL_ENV = "FEDMERGE_LOG_LEVEL"  # the CLI's level (INFO: --verbose, DEBUG: --debug) handed to the ServerApp's process


def configure_logging(verbose: bool = False, debug: bool = False) -> None:
    """Root level WARNING (default), INFO (``verbose``) or DEBUG (``debug``); the frameworks' loggers and Ray's
    FutureWarnings are silenced unless ``verbose`` or ``debug``."""
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(format=FORMAT)  # a no-op where handlers exist already (e.g. under pytest)
    logging.getLogger().setLevel(level)
    if not (verbose or debug):
        quiet_frameworks()


def quiet_frameworks() -> None:
    """Raise the frameworks' logger levels (:data:`FRAMEWORK_LOGGERS`) and hide Ray's FutureWarnings. Flower sets
    its logger to DEBUG when imported, so code that imports Flower calls this again afterwards (unless verbose)."""
    for name, framework_level in FRAMEWORK_LOGGERS.items():
        logging.getLogger(name).setLevel(framework_level)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray(\.|$)")


def verbose_enabled() -> bool:
    """Whether the user asked for framework output (``--verbose``/``--debug``): fedmerge's INFO logs are enabled."""
    return logging.getLogger("fedmerge").isEnabledFor(logging.INFO)


def configure_from_env() -> None:
    """In the ServerApp's and the simulated ClientApps' processes under ``fedmerge simulate``: the launching CLI's
    ``--verbose``/``--debug`` (:data:`LEVEL_ENV`); nothing when it is unset (a plain ``flwr run``, a SuperNode)."""
    level = os.environ.get(LEVEL_ENV, "")
    if level:
        configure_logging(verbose=level == "INFO", debug=level == "DEBUG")
