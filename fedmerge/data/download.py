"""Fetch MergeRec's published Amazon tarballs, verify their sha256, and unpack them atomically.

Each domain is downloaded to a temporary file next to the destination, checked against the known sha256, unpacked
into a temporary folder and moved into ``DEST/<Domain>/`` with one rename; on any failure the temporaries are
removed, so nothing half-unpacked is left behind.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from fedmerge.data.amazon import AMAZON_FILES
from fedmerge.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_AMAZON_SOURCE = "https://github.com/DIALLab-SKKU/MergeRec/raw/main/datasets/"
AMAZON_SHA256: dict[str, str] = {
    "Beauty": "178739b3d2d154a7355a112cc1998f714ac443cf96a9bed5bb09a487a00eeceb",
    "Pantry": "446860493bda86a9c978280a210123fd17c298a746e97e4af11a65c96470252a",
    "Toys": "2dfc146e57c40a760110eb6bc0a3b51d2481d98f8c6b66be8535959269a50ba4",
}
"""The registry of known domains: tarball sha256 as published alongside the shared copies."""
CHUNK_BYTES = 1 << 20


def parse_domains(text: str | Sequence[str]) -> list[str]:
    """Known domain names from ``"Pantry,Toys"`` or a list; an unknown name is an error listing the valid ones."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise DataError(f"no domains given; valid: {', '.join(AMAZON_SHA256)}")
    unknown = [n for n in names if n not in AMAZON_SHA256]
    if unknown:
        raise DataError(f"unknown Amazon domain(s) {', '.join(unknown)}; valid: {', '.join(AMAZON_SHA256)}")
    return names


URL_SCHEMES = ("http", "https", "file", "ftp")  # what a download source may be besides a local folder


def tarball_location(domain: str, source: str | Path | None = None) -> str:
    """Where ``<domain>.tar.gz`` comes from: a local folder, a URL prefix, or (default) MergeRec's repository."""
    source = DEFAULT_AMAZON_SOURCE if source is None else str(source)
    try:
        scheme = urllib.parse.urlparse(source).scheme
    except ValueError as exc:
        raise DataError(f"source {source}: not a valid URL ({exc})") from None
    if scheme in URL_SCHEMES:
        return source.rstrip("/") + f"/{domain}.tar.gz"
    folder = Path(source)
    if not folder.is_dir():
        raise DataError(f"source {source}: neither a folder nor a URL (http://, https://, file://)")
    return str(folder / f"{domain}.tar.gz")


def _fetch(location: str, target: Path) -> str:
    """Copy ``location`` (URL or local file) to ``target``; return the sha256 hex digest of the bytes."""
    digest = hashlib.sha256()
    try:
        if urllib.parse.urlparse(location).scheme in URL_SCHEMES:  # else a local folder, "mirror:2024/" one too
            source = urllib.request.urlopen(location, timeout=60)  # noqa: S310 - schemes checked in tarball_location
            size = int(source.headers.get("Content-Length") or 0) or None
        else:
            source = open(location, "rb")
            size = os.path.getsize(location)
        with source, target.open("wb") as out:
            with tqdm(total=size, unit="B", unit_scale=True, desc=Path(location).name, leave=False) as bar:
                while chunk := source.read(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        # ValueError: a malformed URL (http://[::1/) or Content-Length; HTTPException: a bad port, a short read
        raise DataError(f"could not fetch {location}: {type(exc).__name__}: {exc}") from None
    return digest.hexdigest()


def _unpack(tarball: Path, domain: str, workdir: Path) -> Path:
    """Unpack into ``workdir`` with tarfile's ``data`` filter; return the unpacked ``<domain>/`` folder."""
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            archive.extractall(workdir, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"{domain}.tar.gz: cannot unpack ({type(exc).__name__}: {exc})") from None
    folder = workdir / domain
    missing = [f for f in AMAZON_FILES if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{domain}.tar.gz: unpacked folder {domain}/ lacks {', '.join(missing)}")
    return folder


def download_amazon(
    domains: str | Sequence[str], dest: str | Path, source: str | Path | None = None, force: bool = False
) -> list[Path]:
    """Download, verify and unpack each domain into ``dest/<Domain>/``; returns those folders.

    An existing ``dest/<Domain>/`` is kept (and logged) unless ``force``, which replaces it.
    """
    names = parse_domains(domains)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    folders = []
    for domain in names:
        final = dest / domain
        if final.exists() and not final.is_dir():
            raise DataError(f"{final} exists and is not a folder: move it away (a domain unpacks into that folder)")
        if final.exists() and not force:
            missing = [name for name in AMAZON_FILES if not (final / name).is_file()]
            if missing:  # an interrupted copy or another folder: it was kept and reported as downloaded
                raise DataError(f"{final} exists but lacks {', '.join(missing)}: not a downloaded {domain}; replace it "
                                "with --force or move it away")
            logger.warning("%s already present at %s; skipping (--force replaces it)", domain, final)
            folders.append(final)
            continue
        location = tarball_location(domain, source)
        with tempfile.TemporaryDirectory(dir=dest, prefix=f".{domain}-") as tmp:
            tarball = Path(tmp) / f"{domain}.tar.gz"
            logger.info("fetching %s", location)
            digest = _fetch(location, tarball)
            if digest != AMAZON_SHA256[domain]:
                raise DataError(
                    f"{location}: sha256 {digest} does not match the expected {AMAZON_SHA256[domain]}; "
                    "corrupt or wrong file, nothing unpacked"
                )
            unpacked = _unpack(tarball, domain, Path(tmp) / "unpacked")
            if final.exists():  # move the old copy into the temporary folder, which is removed on exit
                os.replace(final, Path(tmp) / "replaced")
            os.replace(unpacked, final)
        logger.info("%s verified and unpacked into %s", domain, final)
        folders.append(final)
    return folders
