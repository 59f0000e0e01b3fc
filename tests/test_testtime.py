"""Test-time MergeRec for a catalog no client trained on (fedmerge.merging.testtime), on test_mergerec's toy family."""

from __future__ import annotations

import pytest
import torch

from fedmerge.merging.mergerec import MergeRecConfig, PseudoUserObjective
from fedmerge.merging.testtime import mergerec_for_new_catalog
from tests.test_mergerec import DIM, FAST, setup


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def new_catalog(n: int = 8) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(42))


def test_the_new_catalogs_teacher_drives_the_coefficients():
    family, theta0, models, features = setup()
    config = MergeRecConfig(**{**FAST, "steps": 80})
    # teacher y on the new catalog only: λ moves towards "y alone" (the student can match the teacher exactly there)
    _, report = mergerec_for_new_catalog(family, theta0, models, features, "w", new_catalog(), config, teacher="y",
                                  include_seen=False)
    lam = {d: report.coefficients[d]["all"] for d in models}
    assert report.domains == ["x", "y", "z"] and lam["y"] > 0.6 and lam["y"] > 2 * max(abs(lam["x"]), abs(lam["z"]))
    # the seen domains' pseudo-users pull λ back towards a compromise
    _, mixed = mergerec_for_new_catalog(family, theta0, models, features, "w", new_catalog(), config, teacher="y")
    assert mixed.coefficients["y"]["all"] < lam["y"]


def test_only_public_inputs_of_the_new_catalog_form_its_pseudo_users():
    family, theta0, models, features = setup()
    objective = PseudoUserObjective(family, theta0, models, {"w": new_catalog(5)}, MergeRecConfig(**FAST),
                                    teachers={"w": theta0}, pseudo_domains=["w"])
    assert objective.domains == ["x", "y", "z"] and len(objective.users()) == 5
    # teacher θ₀ and λ = 0: the student is the teacher, so only the hard-label term remains
    at_zero, away = objective.mean_loss(torch.zeros(3, 1)), objective.mean_loss(torch.full((3, 1), 0.5))
    assert at_zero < away


def test_bad_teacher_or_a_seen_domain_is_refused():
    family, theta0, models, features = setup()
    config = MergeRecConfig(**FAST)
    with pytest.raises(ValueError, match=r"valid: \['theta0', 'x', 'y', 'z'\]"):
        mergerec_for_new_catalog(family, theta0, models, features, "w", new_catalog(), config, teacher="q")
    with pytest.raises(ValueError, match="no client trained on"):
        mergerec_for_new_catalog(family, theta0, models, features, "x", features["x"], config)
