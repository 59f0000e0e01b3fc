"""Crash-safe result files: atomic JSON/bytes writes and per-client weight files (safetensors).

Every write goes to a temporary file in the target folder, is flushed to disk, and is renamed into place with
``os.replace``, so a reader (or a crash) sees either the old file or the complete new one, never half a file.

A run holds :func:`run_folder` on its output folder for its whole duration: an exclusive ``flock`` on
``<out_dir>/.fedmerge.lock`` (a second run into the folder fails at once) and a refusal to write into a folder that
already holds an earlier run's files unless the run resumes from them or was told to overwrite them.

Client weights live at ``<out_dir>/clients/<file-safe domain>.safetensors`` with the real domain name in the
safetensors metadata, so a run can re-merge from saved weights without retraining (``--resume``).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from fedmerge.errors import DataError, FedmergeError

if TYPE_CHECKING:  # torch is imported by the weight functions only: the CLI's --help and data commands need none
    from fedmerge.models.base import StateDict
    from fedmerge.scenario import Scenario

logger = logging.getLogger(__name__)

CLIENTS_DIR = "clients"
WEIGHTS_SUFFIX = ".safetensors"
DOMAIN_KEY = "domain"
LOCK_FILE = ".fedmerge.lock"
DATA_DIGESTS_FILE = "data_digests.json"  # sha256 of each domain's files when the run started (runners.simulation)
START_FILES = (LOCK_FILE, DATA_DIGESTS_FILE)  # what a run writes before anything else: no earlier run by themselves


def save_figure_atomic(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """A matplotlib figure as PNG at ``path`` through :func:`write_bytes_atomic` (never a half-written image), then
    closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return write_bytes_atomic(path, buffer.getvalue())


def _umask() -> int:
    """The process's file-creation mask, read from ``/proc/self/status`` where it is there (no window in which
    another thread creates files under a changed mask), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` via a temporary sibling file, fsync and ``os.replace``.

    The temporary file gets a fresh random name, created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600
    (``tempfile.mkstemp``), so a file or symlink planted in the folder never receives the data. Before the rename
    it gets ``mode`` (0o600 for a private key), or by default the mode ``open()`` gives a new file: 0666 less the
    umask, so results in a shared folder are as readable as the user's other files.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            os.fchmod(handle.fileno(), 0o666 & ~_umask() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):  # ENOSPC, EACCES, EROFS, ...: name the file, not only the errno
            raise FedmergeError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    return path


@contextmanager
def run_folder(
    out_dir: str | Path, *, resume: bool = False, overwrite: bool = False, set_aside: bool = False,
    resumable: bool = True,
) -> Iterator[Path]:
    """Hold ``out_dir`` for one run: an exclusive lock for the run's duration and no silent reuse of old files.

    The lock is ``fcntl.flock`` on ``<out_dir>/.fedmerge.lock`` (released by the kernel when the process dies, so a
    killed run never leaves a stale lock); a second run into the folder fails at once naming the holder's pid. A
    folder with other entries is refused unless ``resume`` (the run re-merges from them), ``overwrite`` (they are
    deleted first, after the lock is taken) or ``set_aside`` (they are moved into ``<out_dir>.unfinished-<UTC
    time>/`` beside it under the same lock, so no other run can start in the folder between the move and this run:
    how a resumed multi-seed run or privacy study runs an unfinished seed again without deleting its trained
    weights). Lock files and empty folders left by a run that failed before writing anything do not count. A folder
    with entries but no lock file (no fedmerge run held it: a home or project folder given as ``--out`` by mistake)
    is refused whatever the flags, and left without a lock file, so a second try with ``--overwrite`` cannot empty it.
    ``resumable``: whether the refusal may suggest ``--resume`` (not for a deployment).
    """
    if sum((resume, overwrite, set_aside)) > 1:
        raise FedmergeError("a run folder's earlier files are resumed from, deleted or set aside: pass only one of "
                            f"resume={resume}, overwrite={overwrite}, set_aside={set_aside}")
    out = Path(out_dir)
    lock_path = out / LOCK_FILE
    used_before = lock_path.exists()  # a fedmerge run held this folder: what --overwrite may delete
    if not used_before and out.is_dir():  # before any lock file: one made (then removed) in a refused folder would
        _refuse_foreign(out, earlier_entries(out), resumable)  # mark it a run's for a concurrent --overwrite
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise FedmergeError(f"cannot use {out} as the run folder: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise FedmergeError(f"cannot lock {lock_path}: {exc.strerror or exc}") from exc
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise FedmergeError(
                f"run folder {out} is in use by another run (pid {holder}, lock {lock_path}); wait for it to finish "
                "or choose another output folder"
            ) from None
        try:
            same = os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # another process removed it after our open: our lock guards nothing a next run would see
            raise FedmergeError(f"{lock_path} was replaced while this run locked it (another run took or refused the "
                                "folder at the same moment); try again")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        earlier = earlier_entries(out)
        listed = _listed(earlier)
        if earlier and not used_before:  # files came between the check above and the lock
            lock_path.unlink(missing_ok=True)  # a refused folder stays as it was (the lock would mark it a run's)
            _refuse_foreign(out, earlier, resumable)
        if earlier and set_aside:
            _move_aside(out, earlier)
        elif earlier and not resume:
            if not overwrite:
                raise FedmergeError(
                    f"run folder {out} already holds an earlier run's files ({listed}); "
                    + ("resume from them (--resume), " if resumable else "")
                    + "delete them (--overwrite) or choose another output folder"
                )
            logger.warning("--overwrite: deleting the %d entries already in %s", len(earlier), out)
            for entry in earlier:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        yield out
    finally:
        os.close(fd)  # closing the only descriptor releases the flock


def _listed(entries: list[Path]) -> str:
    return f"{', '.join(p.name for p in entries[:5])}{', ...' if len(entries) > 5 else ''}"


def _refuse_foreign(out: Path, entries: list[Path], resumable: bool) -> None:
    """FedmergeError when ``out`` holds ``entries`` but no fedmerge run held it (no lock file): whatever the flags
    (--resume too: its lock stayed, and a later --overwrite emptied the folder)."""
    if entries:
        raise FedmergeError(
            f"{out} holds files no fedmerge run left ({_listed(entries)}; it has no {LOCK_FILE}): choose another "
            "output folder (--overwrite deletes only what an earlier run left there"
            + (", --resume resumes only a run)" if resumable else ")")
        )


def check_output_folder(path: str | Path, flag: str = "--out") -> None:
    """FedmergeError naming ``flag`` when ``path`` exists and is not a folder (it surfaced as "[Errno 17] File
    exists")."""
    if Path(path).exists() and not Path(path).is_dir():
        raise FedmergeError(f"{flag} {path} is a file, not a folder")


def _move_aside(folder: Path, entries: list[Path]) -> None:
    """Move ``entries`` (what an unfinished run left in ``folder``: trained client weights, a failed run's results)
    into a new ``<folder>.unfinished-<UTC time>/`` beside it. Called under ``folder``'s lock."""
    kept = folder.with_name(f"{folder.name}.unfinished-{utc_stamp()}")
    kept.mkdir()
    for entry in entries:
        entry.rename(kept / entry.name)
    logger.warning("%s held an unfinished run: its files moved to %s (nothing deleted); running it again", folder, kept)


def utc_stamp() -> str:
    """The current UTC time as a file-name part (``20261207T171604.123456Z``): what an earlier run's kept files are
    suffixed with."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def earlier_entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` an earlier run left (:func:`_holds_files`), sorted: what :func:`run_folder` refuses,
    deletes or sets aside."""
    return sorted(p for p in folder.iterdir() if _holds_files(p))


def _holds_files(path: Path) -> bool:
    """Whether ``path`` is, or contains, anything but :data:`START_FILES` and empty folders: what a run that failed
    before writing results or weights leaves (e.g. a multi-seed run's ``seed-0/.fedmerge.lock``) does not count as an
    earlier run."""
    if path.is_dir() and not path.is_symlink():
        return any(_holds_files(child) for child in path.iterdir())
    return path.name not in START_FILES


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON, written atomically (NaN/Inf are refused rather than written as invalid JSON)."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False, default=json_default)
    except ValueError as exc:
        raise FedmergeError(f"cannot write {path}: {exc}") from exc
    return write_bytes_atomic(path, (text + "\n").encode("utf-8"))


def json_default(value: Any) -> Any:
    """numpy/torch scalars and arrays, and paths, as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"object of type {type(value).__name__} is not JSON serializable")


def check_outside(path: str | Path, out_dir: str | Path, what: str, taker: str = "the run") -> None:
    """FedmergeError when ``path`` (``what``: how the user named it) lies inside ``out_dir``, which ``taker`` takes
    over (``--overwrite`` empties it): the user's input would be deleted with the earlier run's files."""
    if Path(path).resolve().is_relative_to(Path(out_dir).resolve()):
        raise FedmergeError(f"{what} {path} lies inside --out {out_dir}, which {taker} takes over (--overwrite "
                            "empties it): keep them apart")


def check_data_outside(cfg: Scenario, out_dir: str | Path, taker: str = "the run") -> None:
    """:func:`check_outside` for the scenario's data root (synthetic data has none)."""
    if cfg.data.source != "synthetic":
        check_outside(cfg.data.root_path(), out_dir, "the data root", taker)


def safe_file_stem(name: str) -> str:
    """A file name for ``name``: characters other than letters, digits, ``.-_`` become ``_``; never empty/hidden."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    if not stem:
        raise ValueError(f"cannot make a file name from {name!r}")
    return stem


def save_weights(path: str | Path, weights: StateDict, metadata: Mapping[str, str] | None = None) -> Path:
    """Weights as a safetensors file (contiguous CPU copies), written atomically, with string metadata."""
    from safetensors.torch import save

    tensors = {name: t.detach().cpu().contiguous() for name, t in weights.items()}
    return write_bytes_atomic(path, canonical_safetensors(save(tensors, metadata=dict(metadata or {}))))


def canonical_safetensors(blob: bytes) -> bytes:
    """``blob`` with its JSON header's keys sorted: safetensors writes the header's maps in a random order, so the
    same weights and metadata gave files of different sha256. The format: an 8-byte little-endian header length,
    the header (padded with spaces to a multiple of 8 bytes), then the tensor data, whose offsets are relative to
    its start and so unchanged."""
    length = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + length]), sort_keys=True, separators=(",", ":"),
                        ensure_ascii=False).encode("utf-8")
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + blob[8 + length :]


def load_weights(path: str | Path) -> StateDict:
    """Weights from a safetensors file; a clear DataError when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"weight file {path} does not exist")
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"weight file {path} is not a readable safetensors file: {exc}") from exc


def weights_digest(weights: StateDict) -> str:
    """Short sha256 over every tensor's name, dtype, shape and bytes (sorted by name): the weights' identity."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of a weight file; a clear DataError when it is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"weight file {path} is not a readable safetensors file: {exc}") from exc


def client_weights_path(out_dir: str | Path, domain: str) -> Path:
    """``<out_dir>/clients/<file-safe domain>.safetensors``."""
    return Path(out_dir) / CLIENTS_DIR / f"{safe_file_stem(domain)}{WEIGHTS_SUFFIX}"


def save_client_weights(
    out_dir: str | Path, domain: str, weights: StateDict, metadata: Mapping[str, str] | None = None
) -> Path:
    """Save one client's trained weights atomically; the domain name (and ``metadata``) go into the file."""
    meta = {**dict(metadata or {}), DOMAIN_KEY: domain}
    path = save_weights(client_weights_path(out_dir, domain), weights, meta)
    logger.debug("saved weights of %s to %s", domain, path)
    return path


def load_client_weights(out_dir: str | Path) -> dict[str, StateDict]:
    """Every saved client's weights, keyed by domain name (sorted); a DataError when none were saved."""
    folder = Path(out_dir) / CLIENTS_DIR
    files = sorted(folder.glob(f"*{WEIGHTS_SUFFIX}")) if folder.is_dir() else []
    if not files:
        raise DataError(f"no saved client weights under {folder}; run without --resume first")
    weights: dict[str, StateDict] = {}
    for file in files:
        domain = read_metadata(file).get(DOMAIN_KEY)
        if not domain:
            raise DataError(f"weight file {file} has no '{DOMAIN_KEY}' metadata entry")
        if file.stem != safe_file_stem(domain):
            raise DataError(f"weight file {file} names domain {domain!r}, whose file would be "
                            f"{client_weights_path(out_dir, domain).name}: renamed or rewritten, refused")
        if domain in weights:
            raise DataError(f"two weight files under {folder} claim domain {domain!r}")
        weights[domain] = load_weights(file)
    return dict(sorted(weights.items()))


def client_metadata(out_dir: str | Path) -> dict[str, dict[str, str]]:
    """The metadata of every saved client weight file, keyed by domain name."""
    folder = Path(out_dir) / CLIENTS_DIR
    result: dict[str, dict[str, str]] = {}
    for file in sorted(folder.glob(f"*{WEIGHTS_SUFFIX}")) if folder.is_dir() else []:
        meta = read_metadata(file)
        result[meta.get(DOMAIN_KEY, file.stem)] = meta
    return result

