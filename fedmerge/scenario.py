"""What a scenario names, resolved: its domains and their data, the public catalogs, the model family, the text
encoder and the family's item features.

Both sides use these: the server reads only public parts (catalogs, family, encoder, θ₀'s feature width), a
client loads its own domain. Kept apart from :mod:`fedmerge.runners.client` so that server-side code never imports
client modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from fedmerge.config import domain_names
from fedmerge.data.amazon import AMAZON_ROOT_ENV, default_amazon_root
from fedmerge.data.domain import Domain, ItemCatalog
from fedmerge.errors import DataError
from fedmerge.models import ModelFamily, get_family


def amazon_root(cfg: Mapping[str, Any]) -> Path:
    """``data.root``, else $FEDMERGE_AMAZON_DIR, else ``data/amazon`` (relative to the working folder)."""
    return Path(cfg["data"]["root"]).expanduser() if cfg["data"]["root"] else default_amazon_root()


def domain_path(cfg: Mapping[str, Any], name: str) -> Path:
    """Where domain ``name`` lives under the data root: ``<name>/`` folder or ``<name>.tar.gz``."""
    root = amazon_root(cfg)
    for candidate in (root / name, root / f"{name}.tar.gz"):
        if candidate.exists():
            return candidate
    domains = ",".join(domain_names(cfg))
    raise DataError(
        f"domain {name!r} not found under {root.resolve()} (looked for {name}/ and {name}.tar.gz). Get the data with "
        f"`fedmerge data download amazon --domains {domains} --dest {root}`, or point data.root (--set data.root=DIR) "
        f"or ${AMAZON_ROOT_ENV} at a folder that has it"
    )


def _synthetic_domains(cfg: Mapping[str, Any]) -> dict[str, Domain]:
    sizes = cfg["data"]["synthetic"]
    return _generate_synthetic(int(cfg["run"]["seed"]), tuple(sorted(sizes.items())))


@lru_cache(maxsize=2)
def _generate_synthetic(seed: int, sizes: tuple[tuple[str, Any], ...]) -> dict[str, Domain]:
    """The seeded synthetic domains, generated once per process (callers only read them)."""
    from fedmerge.data.synthetic import make_synthetic_domains

    return {d.name: d for d in make_synthetic_domains(seed=seed, **dict(sizes))}


def load_named_domain(cfg: Mapping[str, Any], name: str) -> Domain:
    """Domain ``name`` of the scenario's data source."""
    source = cfg["data"]["source"]
    if source == "synthetic":
        return _synthetic_domains(cfg)[name]
    path = domain_path(cfg, name)
    if source == "amazon":
        from fedmerge.data.amazon import load_amazon_domain

        return load_amazon_domain(path, name=name)
    from fedmerge.data import load_domain

    return load_domain(path)


def load_catalog(cfg: Mapping[str, Any], name: str) -> ItemCatalog:
    """The public catalog of domain ``name`` (what the server may read)."""
    if cfg["data"]["source"] == "synthetic":
        return _synthetic_domains(cfg)[name].catalog  # the generator is seeded; only the catalog is used
    from fedmerge.data import load_catalog as load_public_catalog

    return load_public_catalog(domain_path(cfg, name))


def family_of(cfg: Mapping[str, Any], extra_params: Mapping[str, Any] | None = None) -> ModelFamily:
    """The scenario's model family, with ``extra_params`` laid over ``model.params``."""
    params = {**cfg["model"]["params"], **(extra_params or {})}
    return get_family(cfg["model"]["family"], **params)


def feature_width(cfg: Mapping[str, Any], family: ModelFamily) -> int:
    """Width of the family's item features under the scenario's encoder; reads the encoder's config, encodes nothing
    (θ₀ of most families needs only this, so the server does not encode a whole catalog before the clients can start;
    a family whose ``init_reads_catalogs`` is the exception)."""
    return family.feature_width(int(scenario_encoder(cfg).dim))


def item_features(cfg: Mapping[str, Any], catalog: ItemCatalog, family: ModelFamily) -> torch.Tensor:
    """The family's input features for a catalog, from (cached) text embeddings."""
    from fedmerge.text import EmbeddingCache, encode_catalog

    encoder = scenario_encoder(cfg)
    cache_dir = cfg["encoder"]["cache_dir"]
    cache = EmbeddingCache(cache_dir) if cache_dir else None
    return family.catalog_features(catalog, lambda: encode_catalog(encoder, catalog, cache=cache))


def scenario_encoder(cfg: Mapping[str, Any]) -> Any:
    """The scenario's text encoder (``encoder.name`` with ``encoder.params``), one instance per process."""
    enc = cfg["encoder"]
    return _encoder(enc["name"], tuple(sorted(enc["params"].items())))


@lru_cache(maxsize=4)
def _encoder(name: str, params: tuple[tuple[str, Any], ...]) -> Any:
    from fedmerge.text import get_encoder

    return get_encoder(name, **dict(params))
