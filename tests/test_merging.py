"""Training-free merges against their formulas on tiny hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from fedmerge.merging import merge, processed_task_vectors, resolve_params
from fedmerge.merging.methods import (
    clamp_quantiles,
    drop_random,
    elect_sign_mask,
    pcb_released_vectors,
    pcb_weights,
    trim_magnitude,
)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def state(w: list[list[float]], b: list[float]) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(w), "b": torch.tensor(b)}


THETA0 = state([[0.0, 0.0], [0.0, 0.0]], [1.0, 1.0, 1.0])
MODEL_A = state([[3.0, -1.0], [0.5, 2.0]], [2.0, 0.0, 1.5])
MODEL_B = state([[-2.0, -4.0], [0.25, 1.0]], [0.0, 1.0, 3.0])
MODELS = {"A": MODEL_A, "B": MODEL_B}


def test_average_of_identical_models_is_the_model():
    merged = merge("average", THETA0, {"x": MODEL_A, "y": MODEL_A, "z": MODEL_A})
    for name in MODEL_A:
        torch.testing.assert_close(merged[name], MODEL_A[name])


def test_weighted_average_formula():
    merged = merge("average", THETA0, MODELS, weights=[3, 1])
    for name in MODEL_A:
        torch.testing.assert_close(merged[name], (3 * MODEL_A[name] + MODEL_B[name]) / 4)


def test_task_arithmetic_formula_and_zero_scale():
    merged = merge("task_arithmetic", THETA0, MODELS, scale=0.5)
    for name in THETA0:
        expected = THETA0[name] + 0.5 * ((MODEL_A[name] - THETA0[name]) + (MODEL_B[name] - THETA0[name]))
        torch.testing.assert_close(merged[name], expected)
    zero = merge("task_arithmetic", THETA0, MODELS, scale=0.0)
    for name in THETA0:
        torch.testing.assert_close(zero[name], THETA0[name])


def test_ties_by_hand():
    theta0 = {"v": torch.zeros(4)}
    models = {
        "a": {"v": torch.tensor([4.0, -1.0, 0.5, -3.0])},
        "b": {"v": torch.tensor([-2.0, 3.0, 0.1, -1.0])},
        "c": {"v": torch.tensor([1.0, 2.0, -5.0, 0.2])},
    }
    # density 0.5 keeps the 2 largest |τ| of each model:
    # a: [4, 0, 0, -3]; b: [-2, 3, 0, 0]; c: [0, 2, -5, 0]
    # summed: [2, 5, -5, -3] -> elected signs [+, +, -, -]
    # agreeing: entry0 {a:4}, entry1 {b:3, c:2}, entry2 {c:-5}, entry3 {a:-3}
    # disjoint mean: [4, 2.5, -5, -3]; scale 1
    merged = merge("ties", theta0, models, density=0.5, scale=1.0)
    torch.testing.assert_close(merged["v"], torch.tensor([4.0, 2.5, -5.0, -3.0]))
    halved = merge("ties", theta0, models, density=0.5, scale=0.5)
    torch.testing.assert_close(halved["v"], torch.tensor([2.0, 1.25, -2.5, -1.5]))


def test_ties_processed_vectors_sum_to_disjoint_mean():
    processed = processed_task_vectors("ties", THETA0, MODELS, density=1.0)
    tau_w = torch.stack([MODEL_A["w"], MODEL_B["w"]])
    mask = elect_sign_mask(tau_w)
    expected = (tau_w * mask).sum(0) / mask.sum(0).clamp(min=1)
    torch.testing.assert_close(processed.vectors["w"].sum(0), expected)
    assert processed.vectors["w"].shape == (2, 2, 2)


def test_trim_magnitude_keeps_top_fraction():
    tau = torch.tensor([[1.0, -5.0, 3.0, 0.5, 2.0]])
    torch.testing.assert_close(trim_magnitude(tau, 0.4), torch.tensor([[0.0, -5.0, 3.0, 0.0, 0.0]]))


def test_trim_magnitude_keeps_floor_of_density_times_n():
    tau = torch.tensor([[1.0, -5.0, 3.0, 0.5, 2.0]])
    # ρn = 1.5: int(1.5) = 1 entry as MergeRec's code (⌈1.5⌉ = 2 before; the TIES authors' code keeps 2)
    torch.testing.assert_close(trim_magnitude(tau, 0.3), torch.tensor([[0.0, -5.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(trim_magnitude(tau, 0.1), torch.zeros_like(tau))  # ρn < 1 keeps nothing


def test_sign_election_picks_plus_where_the_sum_is_zero():
    tau = torch.tensor([[2.0, 1.0, 0.0], [-2.0, -3.0, 0.0]])
    # entry 0: 2 - 2 = 0 -> + elected, model 0 kept; entry 1: sum -2 -> -; entry 2: all zero -> nothing
    mask = elect_sign_mask(tau)
    assert mask.tolist() == [[True, False, False], [False, True, False]]


# Two tensors whose magnitudes differ by 100x: a global top-ρ trim keeps only the big tensor's entries.
TWO_TENSOR_THETA0 = {"big": torch.zeros(4), "small": torch.zeros(4)}
TWO_TENSOR_MODELS = {
    "a": {"big": torch.tensor([400.0, -100.0, 300.0, 200.0]), "small": torch.tensor([1.0, -4.0, 2.0, 3.0])},
    "b": {"big": torch.tensor([100.0, 300.0, -400.0, 200.0]), "small": torch.tensor([-3.0, 2.0, 4.0, 1.0])},
}


def test_global_and_per_tensor_ties_differ_on_two_tensors():
    # density 0.25: per tensor ⌊0.25·4⌋ = 1 entry of each tensor per model; globally ⌊0.25·8⌋ = 2 entries per
    # model, both from "big"
    per_tensor = merge("ties", TWO_TENSOR_THETA0, TWO_TENSOR_MODELS, density=0.25)
    # big: a keeps 400 (entry 0), b keeps -400 (entry 2); small: a keeps -4 (entry 1), b keeps 4 (entry 2)
    torch.testing.assert_close(per_tensor["big"], torch.tensor([400.0, 0.0, -400.0, 0.0]))
    torch.testing.assert_close(per_tensor["small"], torch.tensor([0.0, -4.0, 4.0, 0.0]))
    for name in ("ties_global", "ties"):
        params = {} if name == "ties_global" else {"scope": "model"}
        merged = merge(name, TWO_TENSOR_THETA0, TWO_TENSOR_MODELS, density=0.25, **params)
        # a keeps 400, 300 (entries 0, 2); b keeps -400, 300 (entries 2, 1); entry 2: 300 - 400 < 0 -> b's -400
        torch.testing.assert_close(merged["big"], torch.tensor([400.0, 300.0, -400.0, 0.0]))
        torch.testing.assert_close(merged["small"], torch.zeros(4))


def test_pcb_released_by_hand():
    """The released formulas on one model row of 200 entries (quantile clamps need a long row) and two models."""
    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(2, 200, generator=gen)
    n = 200
    density = 0.3
    magnitude = tau.abs()
    lo = magnitude.sort(dim=1).values[:, 2:3]  # int(200·0.01) = 2
    hi = magnitude.sort(dim=1).values[:, 197:198]  # int(200·0.99) - 1 = 197
    magnitude = torch.minimum(torch.maximum(magnitude, lo), hi)
    torch.testing.assert_close(clamp_quantiles(tau.abs(), 0.01, 0.01), magnitude)

    def norm(x):
        lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return (x - lo) / (hi - lo)

    beta = torch.exp(2 * norm(magnitude) ** 2) * torch.tanh(tau * tau.sum(0))
    floor = beta.sort(dim=1).values[:, int(n * (1 - density)) : int(n * (1 - density)) + 1]
    mask = norm(torch.maximum(beta, floor))
    assert ((mask > 0).sum(dim=1) <= n * density).all() and ((mask > 0).sum(dim=1) >= n * density - 1).all()
    expected = torch.sign(tau) * magnitude * mask / mask.sum(0).clamp(min=1e-12) / 2
    torch.testing.assert_close(pcb_released_vectors(tau, density), expected)
    theta0 = {"v": torch.zeros(100), "w": torch.zeros(10, 10)}
    models = {str(k): {"v": tau[k, :100], "w": tau[k, 100:].reshape(10, 10)} for k in range(2)}
    merged = merge("pcb_released", theta0, models, density=density)  # whole-model scope: one row of 200
    torch.testing.assert_close(torch.cat([merged["v"], merged["w"].flatten()]), expected.sum(0))


def test_dare_preserves_expectation_over_seeds():
    tau = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    p = 0.7
    mean = torch.stack([drop_random(tau, p, torch.Generator().manual_seed(s)) for s in range(4000)]).mean(0)
    torch.testing.assert_close(mean, tau, atol=0.15, rtol=0.05)
    one = drop_random(tau, p, torch.Generator().manual_seed(1))
    kept = one != 0
    torch.testing.assert_close(one[kept], tau[kept] / (1 - p))


def test_dare_is_seeded_and_combines_with_bases():
    a = merge("dare", THETA0, MODELS, p=0.5, seed=3)
    b = merge("dare", THETA0, MODELS, p=0.5, seed=3)
    c = merge("dare", THETA0, MODELS, p=0.5, seed=4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    # p=0 reduces DARE to its base; default scale is the base's default
    torch.testing.assert_close(merge("dare", THETA0, MODELS, p=0.0)["w"], merge("task_arithmetic", THETA0, MODELS)["w"])
    ties_like = merge("dare", THETA0, MODELS, p=0.0, base="ties", density=0.5)
    torch.testing.assert_close(ties_like["b"], merge("ties", THETA0, MODELS, density=0.5)["b"])


def test_pcb_by_hand():
    t1 = torch.tensor([2.0, -1.0, 0.0])
    t2 = torch.tensor([1.0, 3.0, -1.0])
    taus = torch.stack([t1, t2])

    def minmax(x):
        return (x - x.min()) / (x.max() - x.min())

    def softmax(x):
        e = [math.exp(v) for v in x.tolist()]
        return torch.tensor([v / sum(e) for v in e])

    betas = []
    for k, tk in enumerate(taus):
        intra = softmax(2 * minmax(tk * tk))
        inter = softmax(minmax(tk * t1)) + softmax(minmax(tk * t2))
        betas.append(intra * inter)
    beta = torch.stack(betas)
    torch.testing.assert_close(pcb_weights(taus, 1.0), beta)
    # ratio 2/3 keeps the 2 largest β of each model
    kept = beta.clone()
    for k in range(2):
        kept[k, beta[k].argmin()] = 0.0
    expected = (kept * taus).sum(0) / kept.sum(0).clamp(min=1e-12)
    merged = merge("pcb", {"v": torch.zeros(3)}, {"1": {"v": t1}, "2": {"v": t2}}, ratio=2 / 3, scale=1.0)
    torch.testing.assert_close(merged["v"], expected)


def test_merge_keeps_dtype_and_names():
    theta0 = {"w": torch.zeros(3, dtype=torch.float64)}
    merged = merge("average", theta0, [{"w": torch.ones(3, dtype=torch.float64)}])
    assert merged["w"].dtype == torch.float64 and list(merged) == ["w"]


def test_unknown_method_lists_valid():
    with pytest.raises(ValueError, match="valid: .*'average'.*'ties'"):
        merge("fisher", THETA0, MODELS)


@pytest.mark.parametrize(
    ("method", "params", "pattern"),
    [
        ("ties", {"densty": 0.2}, "unknown parameter.*densty.*valid"),
        ("ties", {"density": 0.0}, "density=0.0 is invalid"),
        ("ties", {"density": 1.5}, "density=1.5 is invalid"),
        ("dare", {"p": 1.0}, "p=1.0 is invalid"),
        ("dare", {"p": -0.1}, "p=-0.1 is invalid"),
        ("dare", {"base": "average"}, "base='average' is invalid"),
        ("dare", {"density": 0.5}, "density"),
        ("pcb", {"ratio": 0}, "ratio=0 is invalid"),
        ("ties", {"scope": "layer"}, "scope='layer' is invalid; expected one of \\['tensor', 'model'\\]"),
        ("average", {"weights": [1, -1]}, "weights"),
        ("average", {"weights": [1, 2, 3]}, "3 weights for 2 models"),
    ],
)
def test_bad_parameters(method, params, pattern):
    with pytest.raises(ValueError, match=pattern):
        merge(method, THETA0, MODELS, **params)


def test_incompatible_models_name_model_and_parameter():
    bad_shape = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match="model 'B' parameter 'w'"):
        merge("average", THETA0, {"A": MODEL_A, "B": bad_shape})
    with pytest.raises(ValueError, match="model 'B'.*missing \\['b'\\]"):
        merge("average", THETA0, {"A": MODEL_A, "B": {"w": torch.zeros(2, 2)}})
    bad_dtype = {"w": torch.zeros(2, 2, dtype=torch.float64), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match="dtype"):
        merge("average", THETA0, {"B": bad_dtype})
    with pytest.raises(ValueError, match="no models"):
        merge("average", THETA0, {})


def test_resolve_params_fills_paper_defaults():
    assert resolve_params("ties", {}) == {"density": 0.2, "scale": 1.0, "scope": "tensor"}
    assert resolve_params("ties_global", {}) == {"density": 0.2, "scale": 1.0, "scope": "model"}
    assert resolve_params("pcb_released", {}) == {"density": 0.2, "scale": 1.0, "scope": "model"}
    assert resolve_params("task_arithmetic", {})["scale"] == 0.3


def test_merge_command_writes_the_merged_safetensors(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from fedmerge.cli import main

    save_file(THETA0, str(tmp_path / "t0.safetensors"))
    save_file(MODEL_A, str(tmp_path / "a.safetensors"))
    save_file(MODEL_B, str(tmp_path / "b.safetensors"))
    out = tmp_path / "merged.safetensors"
    argv = ["merge", "--theta0", str(tmp_path / "t0.safetensors"), "--models", f"A={tmp_path / 'a.safetensors'}",
            f"B={tmp_path / 'b.safetensors'}", "--method", "ties", "--set", "density=0.5", "--out", str(out)]
    assert main(argv) == 0
    expected = merge("ties", THETA0, MODELS, density=0.5)
    got = load_file(str(out))
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert main(argv[:-4] + ["--set", "density=2", "--out", str(tmp_path / "other.safetensors")]) == 1
    assert "density=2 is invalid" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "dare"])
def test_float64_weights_merge_at_their_own_precision(method):
    theta0 = {"w": torch.tensor([1.0 + 1e-12, 0.1], dtype=torch.float64)}
    merged = merge(method, theta0, {"a": theta0, "b": theta0})
    assert merged["w"].dtype == torch.float64 and torch.equal(merged["w"], theta0["w"])  # it moved by 1.5e-9
    zero = {"w": torch.zeros(1, dtype=torch.float64)}
    models = {k: {"w": torch.full((1,), 0.1, dtype=torch.float64)} for k in "abc"}  # 1/3 is not exact in float32
    assert abs(merge("average", zero, models)["w"].item() - 0.1) < 1e-15  # float32 weights: 3e-9


def test_trim_keeps_int_of_density_times_size_as_the_references():
    """ρ·n = 0.29 · 100 is 28.999999999999996 in floating point: MergeRec's TIES keeps int() of it, 28 (29 were kept)."""
    from fedmerge.merging.methods import trim_magnitude

    tau = torch.arange(1.0, 101.0).reshape(1, 100)
    assert int((trim_magnitude(tau, 0.29) != 0).sum()) == int(0.29 * 100) == 28


def test_trim_keeps_one_entry_fewer_than_the_ties_authors_code():
    """README and trim_magnitude say: MergeRec's code keeps int(ρn) entries (torch.topk), the TIES authors'
    topk_values_mask every entry at or above the (n − int(ρn))-th smallest magnitude, int(ρn) + 1 of distinct ones."""
    from fedmerge.merging.methods import trim_magnitude

    def ties_authors_mask(m: torch.Tensor, density: float) -> torch.Tensor:  # TIES-Merging's topk_values_mask
        d = m.shape[1]
        kth = m.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
        return m.abs() >= kth

    for n, density in ((1, 0.2), (4, 0.2), (10, 0.2), (100, 0.2), (100, 0.29), (7, 0.5)):
        tau = torch.arange(1.0, n + 1.0).reshape(1, n)
        kept = trim_magnitude(tau, density) != 0
        assert int(kept.sum()) == int(density * n) == int(ties_authors_mask(tau, density).sum()) - 1, (n, density)
        mergerec = torch.topk(tau.abs(), int(density * n)).indices  # MergeRec's released trim (distinct values)
        assert torch.equal(kept, torch.zeros(1, n, dtype=torch.bool).scatter_(1, mergerec, True))


def test_merge_weights_follow_the_order_the_models_are_named_in(tmp_path):
    """`--models toys=... beauty=... --set weights=[3,1]` gave toys the weight 1: the weights were matched to the
    models sorted by name, not to the order the help's example (and the printed summary) follows."""
    from safetensors.torch import load_file, save_file

    from fedmerge.cli import main

    save_file(THETA0, str(tmp_path / "t0.safetensors"))
    save_file(MODEL_A, str(tmp_path / "a.safetensors"))
    save_file(MODEL_B, str(tmp_path / "b.safetensors"))
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--theta0", str(tmp_path / "t0.safetensors"), "--models", f"toys={tmp_path / 'a.safetensors'}",
                 f"beauty={tmp_path / 'b.safetensors'}", "--method", "average", "--set", "weights=[3, 1]",
                 "--out", str(out)]) == 0
    expected = merge("average", THETA0, {"toys": MODEL_A, "beauty": MODEL_B}, weights=[3, 1])
    assert all(torch.allclose(load_file(str(out))[n], expected[n]) for n in expected)


def test_a_runs_merge_weights_follow_the_order_of_data_domains():
    from fedmerge.merging.registry import weights_in_order

    params = {"weights": [3.0, 1.0, 2.0], "scale": 1.0}
    assert weights_in_order(params, ["toys", "beauty", "pantry"], ["beauty", "pantry", "toys"]) == {
        "weights": [1.0, 2.0, 3.0], "scale": 1.0}
    assert weights_in_order(params, ["toys", "beauty", "pantry"], ["beauty", "toys"]) == {  # a client left out
        "weights": [1.0, 3.0], "scale": 1.0}
    assert weights_in_order({"weights": None}, ["a", "b"], ["a", "b"]) == {"weights": None}
    with pytest.raises(ValueError, match="weights='123' is invalid"):  # it was read as [1.0, 2.0, 3.0]
        resolve_params("average", {"weights": "123"})


def test_merge_command_refuses_what_would_lose_or_poison_a_file(tmp_path, capsys):
    """An --out that is an input or exists (without --overwrite), a NaN model, a NaN scale: a clear error and
    nothing written or replaced."""
    from safetensors.torch import load_file, save_file

    from fedmerge.cli import main

    save_file(THETA0, str(tmp_path / "t0.safetensors"))
    save_file(MODEL_A, str(tmp_path / "a.safetensors"))
    save_file({n: torch.full_like(t, float("nan")) for n, t in MODEL_B.items()}, str(tmp_path / "nan.safetensors"))
    inputs = ["merge", "--theta0", str(tmp_path / "t0.safetensors"), "--models", f"A={tmp_path / 'a.safetensors'}"]

    def run(*rest):
        code = main([*inputs, *rest])
        return code, capsys.readouterr().err

    code, err = run(f"B={tmp_path / 'a.safetensors'}", "--method", "average", "--out", str(tmp_path / "a.safetensors"))
    assert code == 1 and "is one of the input files" in err
    assert torch.equal(load_file(str(tmp_path / "a.safetensors"))["w"], MODEL_A["w"])
    code, err = run(f"B={tmp_path / 'nan.safetensors'}", "--method", "average", "--out", str(tmp_path / "m.safetensors"))
    assert code == 1 and "model B" in err and "non-finite" in err and not (tmp_path / "m.safetensors").exists()
    code, err = run("--method", "task_arithmetic", "--set", "scale=nan", "--out", str(tmp_path / "m.safetensors"))
    assert code == 1 and "scale=nan is invalid" in err and not (tmp_path / "m.safetensors").exists()
    assert run("--method", "average", "--out", str(tmp_path / "m.safetensors"))[0] == 0
    code, err = run("--method", "ties", "--out", str(tmp_path / "m.safetensors"))
    assert code == 1 and "already exists" in err and "--overwrite" in err
    assert run("--method", "ties", "--out", str(tmp_path / "m.safetensors"), "--overwrite")[0] == 0


# ---- robust aggregation (issue 19): one outlying task vector of three cannot move the merge far ---------------

ATTACKER = state([[1e6, -1e6], [1e6, -1e6]], [-1e6, 1e6, 1e6])
MODEL_C = state([[1.0, -2.0], [0.0, 1.5]], [1.0, 0.5, 2.0])


def test_median_and_trimmed_mean_by_hand():
    models = {"A": MODEL_A, "B": MODEL_B, "C": MODEL_C}
    for name in ("median", "trimmed_mean"):
        merged = merge(name, THETA0, models)
        torch.testing.assert_close(merged["w"], torch.tensor([[1.0, -2.0], [0.25, 1.5]]))
        torch.testing.assert_close(merged["b"], torch.tensor([1.0, 0.5, 2.0]))
    # even K: the mean of the two middle values; trim=0 is the plain average
    four = {**models, "D": THETA0}
    torch.testing.assert_close(merge("median", THETA0, four)["b"], torch.tensor([1.0, 0.75, 1.75]))
    torch.testing.assert_close(merge("trimmed_mean", THETA0, models, trim=0)["w"], merge("average", THETA0, models)["w"])
    # more trimming than the models allow (e.g. after a rejection) leaves the median; two models: their mean
    torch.testing.assert_close(merge("trimmed_mean", THETA0, models, trim=2)["w"], merge("median", THETA0, models)["w"])
    torch.testing.assert_close(merge("trimmed_mean", THETA0, MODELS)["w"], merge("average", THETA0, MODELS)["w"])


def test_robust_methods_ignore_one_huge_attacker_while_the_average_does_not():
    honest = {"A": MODEL_A, "B": MODEL_B}
    attacked = {**honest, "X": ATTACKER}
    assert merge("average", THETA0, attacked)["w"].abs().max() > 1e5
    for name in ("median", "trimmed_mean"):  # the merge stays within the honest values, entry by entry
        merged = merge(name, THETA0, attacked)
        for p in merged:
            lo = torch.minimum(MODEL_A[p], MODEL_B[p])
            hi = torch.maximum(MODEL_A[p], MODEL_B[p])
            assert bool(((merged[p] >= lo) & (merged[p] <= hi)).all()), (name, p)
    clipped = merge("clipped_average", THETA0, attacked)
    for p in clipped:  # the attacker's tensor is clipped to the median norm: at most one honest norm's worth added
        tau = torch.stack([m[p] - THETA0[p] for m in attacked.values()])
        median_norm = tau.reshape(3, -1).norm(dim=1).median()
        assert float((clipped[p] - THETA0[p]).norm()) <= float(median_norm) + 1e-5


def test_clipped_average_formula_and_processed_vectors():
    models = {"A": MODEL_A, "B": MODEL_B, "C": MODEL_C}
    merged = merge("clipped_average", THETA0, models, multiple=0.5)
    for p in THETA0:
        tau = torch.stack([m[p] - THETA0[p] for m in models.values()]).double()
        norms = tau.reshape(3, -1).norm(dim=1)
        factor = torch.clamp(0.5 * norms.median() / norms, max=1.0)
        expected = THETA0[p].double() + (tau * factor.reshape(-1, *[1] * (tau.dim() - 1))).mean(dim=0)
        torch.testing.assert_close(merged[p], expected.float())
    processed = processed_task_vectors("median", THETA0, models)
    assert processed.scale == 1.0  # robust methods have no λ: MergeRec starts at coefficient 1 on τ̃_k
    assert all(int((v != 0).sum(dim=0).max()) <= 1 for v in processed.vectors.values())  # one model per entry
