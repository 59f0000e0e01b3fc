"""Saved models as deliverables: model cards, load_recommender, `fedmerge recommend` / `fedmerge evaluate`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmerge.cli import main
from fedmerge.config import load_scenario
from fedmerge.data import load_catalog, load_domain, save_generic_domain
from fedmerge.data.synthetic import make_synthetic_domains
from fedmerge.errors import DataError, FedmergeError
from fedmerge.recommender import card_path, load_recommender, read_card, save_model, scenario_card, scoring_digest
from fedmerge.runners.inprocess import run_inprocess
from fedmerge.runners.server import initial_weights
from fedmerge.storage import weights_digest
from fedmerge.text import HashingEncoder
from tests.test_federation import TINY

METHODS = 'merge.methods=["ties", "mergerec_layerwise"]'


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny in-process run saved to disk, and each of its domains exported as a generic domain folder."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("recommender")
    cfg = load_scenario("quickstart", [*TINY, METHODS, f"encoder.cache_dir={root / 'cache'}"])
    results = run_inprocess(cfg, root / "run")
    folders = {d: save_generic_domain(cfg.load_domain(d), root / "data" / d) for d in results["domains"]}
    return cfg, root / "run", results, folders


def test_every_evaluated_model_is_saved_with_a_card_holding_its_metrics(run):
    cfg, out, results, _ = run
    models = out / "models"
    shared = {"theta0", "ties", "mergerec_layerwise", "fedavg", "joint"}
    assert {p.stem for p in models.glob("*.safetensors")} == shared
    theta0_digest = read_card(models / "theta0.safetensors")["weights_digest"]
    for name in shared:
        card = read_card(models / f"{name}.safetensors")
        assert card["theta0_digest"] == theta0_digest
        assert card["family"]["name"] == "sequential" and card["encoder"]["name"] == "hashing"
        assert card["encoder"]["dim"] == 32 and card["feature_width"] == 32
        assert card["joint"] is (name == "joint")
        for d in results["domains"]:
            assert card["metrics"][d] == results["models"][name][d]
        assert {"torch", "flwr", "python", "fedmerge_commit"} <= set(card["versions"])
        # every family parameter, defaults included (the scenario names only a few): a later change of a default
        # must not change what the card rebuilds
        assert card["family"]["params"]["lr"] == 2e-3 and card["family"]["params"]["hidden"] == cfg.model.params["hidden"]
        assert "lr" not in cfg.model.params
    assert results["model_params_resolved"] == read_card(models / "ties.safetensors")["family"]["params"]
    # a training-free merge's card holds every parameter with its default (it held only the scenario's: {})
    assert read_card(models / "ties.safetensors")["method"]["params"] == {"density": 0.2, "scale": 1.0,
                                                                          "scope": "tensor"}
    commit = results["versions"]["fedmerge_commit"]
    assert len(commit) >= 40 or commit.startswith(("not a git checkout", "unknown"))
    assert len(results["versions"]["fedmerge_source"]) == 16
    # a run reports every K of README's metrics section (5, 10, 20, 50), masked and unmasked
    assert {f"{m}@{k}{v}" for m in ("recall", "ndcg") for k in (5, 10, 20, 50) for v in ("", "_masked")} <= set(
        results["models"]["ties"]["synth-0"])
    mergerec = read_card(models / "mergerec_layerwise.safetensors")
    assert set(mergerec["mergerec"]["coefficients"]) == set(results["domains"])
    assert mergerec["domains"] == results["domains"]
    assert read_card(models / "fedavg.safetensors")["rounds"] == 1
    for d in results["domains"]:
        card = read_card(out / "clients" / f"{d}.safetensors")
        assert card["domains"] == [d] and card["metrics"] == {d: results["models"]["individual"][d]}


def test_save_then_load_gives_the_in_memory_scores_exactly(run, tmp_path):
    cfg = run[0]
    family = cfg.model.make_family()
    theta0 = initial_weights(cfg)
    generator = torch.Generator().manual_seed(1)
    weights = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in theta0.items()}
    path = save_model(tmp_path / "m.safetensors", weights, {**scenario_card(cfg, weights_digest(theta0)), "name": "m"})
    domain = cfg.load_domain("synth-1")
    seqs = [domain.train[u] for u in range(5)]
    expected = family.scorer(weights, cfg.encoder.item_features(domain.catalog, family))(seqs)
    model = load_recommender(path, cache_dir=cfg.encoder.cache_dir)
    got = model.scores([[domain.catalog.ids[i] for i in s] for s in seqs], catalog=domain.catalog)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", ["mergerec_layerwise", "ties"])
def test_evaluate_command_equals_the_runs_own_evaluation(run, name, capsys):
    cfg, out, results, folders = run
    for d, folder in folders.items():
        assert main(["evaluate", "--model", str(out / "models" / f"{name}.safetensors"), "--data", str(folder),
                     "--cache-dir", cfg.encoder.cache_dir, "--json"]) == 0
        metrics = json.loads(capsys.readouterr().out)["metrics"]
        assert {k: metrics[k] for k in results["models"][name][d]} == results["models"][name][d]
        assert {"recall@5", "ndcg@50_masked"} <= set(metrics)


def test_evaluate_defaults_to_the_split_the_run_evaluated(run, saved_copy, capsys):
    cfg, _, _, folders = run
    args = ["evaluate", "--model", str(saved_copy), "--data", str(folders["synth-0"]), "--cache-dir",
            cfg.encoder.cache_dir, "--json"]
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["split"] == "test"
    _edit_card(saved_copy, **{"eval.split": "val"})
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["split"] == "val"
    assert main([*args, "--split", "test"]) == 0 and json.loads(capsys.readouterr().out)["split"] == "test"


def test_evaluate_a_client_model_prints_a_table(run, capsys):
    cfg, out, _, folders = run
    assert main(["evaluate", "--model", str(out / "clients" / "synth-0.safetensors"), "--data", str(folders["synth-0"]),
                 "--cache-dir", cfg.encoder.cache_dir]) == 0
    text = capsys.readouterr().out
    assert "individual:synth-0 on synth-0" in text and "  50  " in text


@pytest.fixture
def unseen_catalog(tmp_path) -> Path:
    """A domain generated with another seed and size: a catalog the run's models never saw."""
    domain = make_synthetic_domains(n_domains=1, n_users=30, n_items=25, seed=99)[0]
    return save_generic_domain(domain, tmp_path / "unseen")


def test_recommend_on_a_catalog_the_model_never_saw(run, unseen_catalog, capsys):
    cfg, out, _, _ = run
    catalog = load_domain(unseen_catalog).catalog
    history = list(catalog.ids[:3])
    args = ["recommend", "--model", str(out / "models" / "mergerec_layerwise.safetensors"), "--catalog",
            str(unseen_catalog), "--cache-dir", cfg.encoder.cache_dir, "-k", "5"]
    assert main([*args, "--history", ",".join(history), "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)["recommendations"]
    assert len(recs) == 5 and not {r["item"] for r in recs} & set(history)
    assert all(r["item"] in catalog.ids for r in recs)
    assert [r["score"] for r in recs] == sorted((r["score"] for r in recs), reverse=True)
    model = load_recommender(out / "models" / "mergerec_layerwise.safetensors", cache_dir=cfg.encoder.cache_dir)
    scores = model.scores([history], catalog=catalog)[0]
    scores[[catalog.ids.index(i) for i in history]] = -np.inf
    assert [r["item"] for r in recs] == [catalog.ids[i] for i in np.argsort(-scores, kind="stable")[:5]]

    batch = unseen_catalog.parent / "histories.txt"
    texts = [catalog.texts()[0], catalog.texts()[1]]
    batch.write_text(f"{','.join(history)}\n\n{json.dumps(history[:1])}\n")
    assert main([*args, "--histories", str(batch)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(line["recommendations"]) for line in lines] == [5, 5]
    assert [line["line"] for line in lines] == [1, 3]  # the blank line 2 is skipped, each output names its input
    assert [r["item"] for r in lines[0]["recommendations"]] == [r["item"] for r in recs]
    # a history of item texts scores like the same items given by id (the texts are featurized like the catalog's)
    by_text = model.recommend([texts], k=5, catalog=catalog, texts=True, exclude_history=False)[0]
    by_id = model.recommend([history[:2]], k=5, catalog=catalog, exclude_history=False)[0]
    assert [r.item for r in by_text] == [r.item for r in by_id]


def test_item_texts_score_as_the_same_items_by_id_whatever_else_is_in_the_call(run, unseen_catalog, capsys):
    """Texts joined the catalog before its z-score: every score moved with how many texts, and which, a call held
    (one user's top 10 depended on the other lines of a --histories file), and with texts=True the history's own
    catalog items were recommended (exclude_history was ignored)."""
    from fedmerge.data import ItemCatalog

    cfg, out, _, _ = run
    model = load_recommender(out / "models" / "mergerec_layerwise.safetensors", cache_dir=cfg.encoder.cache_dir)
    catalog = load_domain(unseen_catalog).catalog
    texts = catalog.texts()
    by_id = model.scores([list(catalog.ids[:2])], catalog=catalog)[0]
    alone = model.scores([texts[:2]], catalog=catalog, texts=True)[0]
    crowded = model.scores([texts[:2], [texts[5]] * 40, ["an unrelated text"]], catalog=catalog, texts=True)[0]
    np.testing.assert_allclose(alone, by_id, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(crowded, alone, rtol=1e-5, atol=1e-5)
    # the history's items are left out by their text: every catalog item of that text when several share it
    twin = ItemCatalog(ids=(*catalog.ids, "twin"), fields=(*catalog.fields, catalog.fields[0]))
    recs = model.recommend([texts[:2]], k=len(twin), catalog=twin, texts=True)[0]
    assert {r.item for r in recs} == set(twin.ids) - {catalog.ids[0], catalog.ids[1], "twin"}
    kept = model.recommend([texts[:2]], k=len(twin), catalog=twin, texts=True, exclude_history=False)[0]
    assert len(kept) == len(twin)
    with pytest.raises(DataError, match="history 1: entry 1 is an empty item text"):
        model.scores([texts[:1], [texts[0], "  "]], catalog=catalog, texts=True)
    batch = unseen_catalog.parent / "texts.txt"  # in a file: refused by line before any line is printed
    batch.write_text(f"{json.dumps(texts[:2])}\n{json.dumps([texts[0], ' '])}\n")
    assert main(["recommend", "--model", str(out / "models" / "ties.safetensors"), "--catalog", str(unseen_catalog),
                 "--cache-dir", cfg.encoder.cache_dir, "--texts", "--histories", str(batch)]) == 1
    printed = capsys.readouterr()
    assert printed.out == "" and "texts.txt:2: entry 1 is an empty item text" in printed.err


def test_a_history_given_by_title_leaves_that_item_out(run, unseen_catalog):
    """Only an item's full rendered text ("Title Brand: B Category: C") matched: a user who typed the title, as the
    README's example does, was recommended that very item."""
    cfg, out, _, _ = run
    model = load_recommender(out / "models" / "ties.safetensors", cache_dir=cfg.encoder.cache_dir)
    catalog = load_domain(unseen_catalog).catalog
    title = catalog.fields[3]["title"]
    assert title != catalog.texts()[3]  # the synthetic catalog's items have a brand and a category too
    recs = model.recommend([[f"  {title.upper()} "]], k=len(catalog), catalog=catalog, texts=True)[0]
    assert catalog.ids[3] not in {r.item for r in recs} and len(recs) == len(catalog) - 1


def test_recommend_refuses_unknown_item_ids(run, unseen_catalog, capsys):
    cfg, out, _, _ = run
    assert main(["recommend", "--model", str(out / "models" / "ties.safetensors"), "--catalog", str(unseen_catalog),
                 "--cache-dir", cfg.encoder.cache_dir, "--history", "no-such-item"]) == 1
    err = capsys.readouterr().err
    assert "no-such-item" in err and "--texts" in err  # the CLI's flag, not only the API's texts=True
    # in a file, an unknown id on a later line is refused before any line is printed
    catalog = load_domain(unseen_catalog).catalog
    batch = unseen_catalog.parent / "histories.txt"
    batch.write_text("\n".join([",".join(catalog.ids[:2])] * 300 + ["no-such-item"]) + "\n")
    assert main(["recommend", "--model", str(out / "models" / "ties.safetensors"), "--catalog", str(unseen_catalog),
                 "--cache-dir", cfg.encoder.cache_dir, "--histories", str(batch)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "histories.txt:301: 'no-such-item'" in captured.err


@pytest.fixture
def saved_copy(run, tmp_path) -> Path:
    src = run[1] / "models" / "ties.safetensors"
    shutil.copy(src, tmp_path / src.name)
    shutil.copy(card_path(src), card_path(tmp_path / src.name))
    return tmp_path / src.name


def _edit_card(path: Path, rehash: bool = True, **changes) -> None:
    """Change card fields; ``rehash``: write the matching scoring digest too (a card that is wrong but consistent,
    for the checks behind the digest's)."""
    card = json.loads(card_path(path).read_text())
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            card[section][field] = value
        else:
            card[section] = value
    if rehash and "scoring_digest" in card:
        card["scoring_digest"] = scoring_digest(card)
    card_path(path).write_text(json.dumps(card))


def test_a_card_edited_after_it_was_written_is_refused(saved_copy, run, caplog):
    """Only the weights were bound to the card (weights_digest): an edited family parameter or a domain's local
    parameters (applied by evaluate / recommend --as-domain) loaded silently and scored differently."""
    card = json.loads(card_path(saved_copy).read_text())
    params = dict(card["family"]["params"])
    key = next(k for k, v in params.items() if isinstance(v, float))
    _edit_card(saved_copy, rehash=False, **{"family.params": {**params, key: params[key] * 2}})
    with pytest.raises(DataError, match=r"ties.json was changed after it was written: its family, encoder, "
                                        r"feature_width, local_parameters do not match"):
        load_recommender(saved_copy)
    _edit_card(saved_copy, rehash=False, **{"family.params": params})  # as written: loads again
    assert load_recommender(saved_copy).card["family"]["params"] == params
    del card["scoring_digest"]  # a card from before the digest: loads, with a warning
    card_path(saved_copy).write_text(json.dumps(card))
    load_recommender(saved_copy)
    assert "its card predates scoring digests" in caplog.text


def test_refuses_a_card_whose_encoder_does_not_fit(saved_copy):
    with pytest.raises(FedmergeError, match=r"hashing:dim16.*width 16.*hashing:dim32.*width 32"):
        load_recommender(saved_copy, encoder=HashingEncoder(dim=16))


def test_refuses_a_card_whose_width_does_not_fit(saved_copy):
    _edit_card(saved_copy, feature_width=48)
    with pytest.raises(FedmergeError, match=r"width 32 .* trained on width 48"):
        load_recommender(saved_copy)


def test_refuses_a_card_whose_family_does_not_fit(saved_copy):
    _edit_card(saved_copy, **{"family.name": "text-lae", "family.params": {}})
    with pytest.raises(FedmergeError, match=r"do not fit family 'text-lae'"):
        load_recommender(saved_copy)
    _edit_card(saved_copy, **{"family.name": "nope"})
    with pytest.raises(FedmergeError, match=r"unknown model family 'nope'; valid: \['sequential', 'text-lae'\]"):
        load_recommender(saved_copy)


def test_truncated_altered_or_cardless_weights_are_data_errors(saved_copy):
    data = saved_copy.read_bytes()
    saved_copy.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable safetensors file"):
        load_recommender(saved_copy)
    saved_copy.write_bytes(data[:-4] + bytes(4))  # same size, last float changed
    with pytest.raises(DataError, match="does not hold the weights its card"):
        load_recommender(saved_copy)
    card_path(saved_copy).unlink()
    with pytest.raises(DataError, match="has no model card"):
        load_recommender(saved_copy)


def test_resume_saves_the_models_again(run, tmp_path):
    cfg, out, _, _ = run
    target = tmp_path / "resumed"
    shutil.copytree(out, target)
    for card in (target / "models").glob("*.json"):
        card.unlink()
    run_inprocess(cfg, target, resume=True)
    assert {p.stem for p in (target / "models").glob("*.json")} == {"theta0", "ties", "mergerec_layerwise", "joint"}


def test_recommend_on_a_real_amazon_catalog(run, amazon_dir, capsys):
    """A model trained on synthetic domains ranks a real catalog it never saw (Toys, 11,924 items)."""
    from tests.conftest import amazon_domain_source

    cfg, out, _, _ = run
    source = amazon_domain_source(amazon_dir, "Toys")
    catalog = load_catalog(source)
    history = list(catalog.ids[:4])
    assert main(["recommend", "--model", str(out / "models" / "mergerec_layerwise.safetensors"), "--catalog",
                 str(source), "--cache-dir", cfg.encoder.cache_dir, "--history", ",".join(history), "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)["recommendations"]
    assert len(recs) == 10 and all(r["item"] in catalog.ids and r["item"] not in history for r in recs)


def test_local_parameters_each_domain_serves_merges_with_its_own_last_item_bias(tmp_path, monkeypatch, capsys):
    """merge.local_parameters: every shared model carries the clients' median b (for a held-out domain; their mean
    for two), each training domain evaluates it with its own b, the card keeps every domain's b and `evaluate`
    reproduces the run's metrics."""
    cfg = load_scenario("quickstart", [
        *TINY, 'merge.methods=["ties", "task_arithmetic", "dare"]', "run.seed=3", "model.params.last_item_bias=true",
        "model.params.last_item_bias_lr=0.05", "model.params.max_epochs=2", 'data.held_out=["synth-2"]',
        'merge.local_parameters=["last_item_bias"]', "baselines.joint=false", f"encoder.cache_dir={tmp_path / 'c'}"])
    import fedmerge.runners.client as client_module

    received: dict[tuple[str, str], float] = {}  # (domain, model) -> b of the weights the server sent it
    evaluate = client_module.client_evaluate

    def recording(domain, models, *args, **kwargs):
        received.update({(domain.name, name): float(w["last_item_bias"]) for name, w in models.items()})
        return evaluate(domain, models, *args, **kwargs)

    monkeypatch.setattr(client_module, "client_evaluate", recording)
    results = run_inprocess(cfg, tmp_path / "run")
    own = {d: load_recommender(tmp_path / "run" / "clients" / f"{d}.safetensors", cache_dir=cfg.encoder.cache_dir)
           .weights["last_item_bias"] for d in ("synth-0", "synth-1")}
    assert own["synth-0"] != own["synth-1"]
    mean = (own["synth-0"].double() + own["synth-1"].double()) / 2
    assert results["merge_report"]["local_parameters"]["shared"] == {"last_item_bias": pytest.approx(float(mean))}
    for name in ("ties", "task_arithmetic", "fedavg"):  # TIES alone would trim b to zero, FedAvg weights by users
        model = load_recommender(tmp_path / "run" / "models" / f"{name}.safetensors", cache_dir=cfg.encoder.cache_dir)
        assert model.local_domains == ["synth-0", "synth-1"]
        kept = {d: model.for_domain(d).weights["last_item_bias"] for d in own}  # FedAvg: the last round's updates
        assert float(model.weights["last_item_bias"]) == pytest.approx(float(sum(kept.values()) / 2), abs=1e-6)
        assert model.for_domain("synth-2") is model  # the held-out domain has no own b: the shared one
        for d in ("synth-0", "synth-1", "synth-2"):
            sent = model.for_domain(d).weights["last_item_bias"]
            assert received[(d, name if name != "fedavg" else "fedavg_round1")] == float(sent)
        if name != "fedavg":
            assert kept == own and float(model.weights["last_item_bias"]) == pytest.approx(float(mean), abs=1e-6)
        for d in ("synth-0", "synth-1", "synth-2"):
            metrics = model.evaluate(cfg.load_domain(d))
            assert {k: metrics[k] for k in results["models"][name][d]} == results["models"][name][d]
    # a domain folder under another name: --as-domain picks the card's values, as the run served that domain
    folder = save_generic_domain(cfg.load_domain("synth-0"), tmp_path / "renamed")
    args = ["evaluate", "--model", str(tmp_path / "run" / "models" / "ties.safetensors"), "--data", str(folder),
            "--cache-dir", cfg.encoder.cache_dir, "--json"]
    assert main([*args, "--as-domain", "synth-0"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert {k: metrics[k] for k in results["models"]["ties"]["synth-0"]} == results["models"]["ties"]["synth-0"]
    assert main([*args, "--as-domain", "synth-2"]) == 1
    assert "holds no local parameters of domain 'synth-2'; its card has them for ['synth-0', 'synth-1']" in \
        capsys.readouterr().err
    # `fedmerge merge` of the run's clients next to its θ₀ reproduces the run's merge: θ₀'s card names the local
    # parameters, so the merge carries the clients' median and each domain's own values as the run's did
    for method in ("ties", "dare"):  # DARE's masks follow the run's seed (3), as in the run
        merged = tmp_path / f"again_{method}.safetensors"
        assert main(["merge", "--method", method, "--theta0", str(tmp_path / "run" / "models" / "theta0.safetensors"),
                     "--models", *(f"{d}={tmp_path / 'run' / 'clients' / f'{d}.safetensors'}" for d in reversed(own)),
                     "--out", str(merged)]) == 0
        capsys.readouterr()
        again = load_recommender(merged, cache_dir=cfg.encoder.cache_dir)
        assert again.local_domains == ["synth-0", "synth-1"]
        assert read_card(merged)["method"]["params"] == read_card(tmp_path / "run" / "models" / f"{method}.safetensors")[
            "method"]["params"]
        for d in ("synth-0", "synth-1", "synth-2"):
            metrics = again.evaluate(cfg.load_domain(d))
            assert {k: metrics[k] for k in results["models"][method][d]} == results["models"][method][d]
    # a model named other than its domain: its own values would be recorded under that name and never found when
    # the merge is evaluated on its domain (the merge scored with the shared median, silently)
    assert main(["merge", "--method", "ties", "--theta0", str(tmp_path / "run" / "models" / "theta0.safetensors"),
                 "--models", f"a={tmp_path / 'run' / 'clients' / 'synth-0.safetensors'}",
                 f"synth-1={tmp_path / 'run' / 'clients' / 'synth-1.safetensors'}",
                 "--out", str(tmp_path / "renamed.safetensors")]) == 1
    assert "model a (" in (err := capsys.readouterr().err) and "is domain 'synth-0''s (its card): name it by its" in err
    bad = load_scenario("quickstart", [*TINY, 'merge.local_parameters=["last_item_bias"]'])
    with pytest.raises(FedmergeError, match="merge.local_parameters names \\['last_item_bias'\\], which are not weights"):
        run_inprocess(bad, tmp_path / "bad")


@pytest.mark.parametrize(("changes", "message"), [
    ({"family": "sequential"}, r"'family.name' must be a string, got None"),
    ({"encoder.identity": None}, r"'encoder.identity' must be a string, got None"),
    ({"feature_width": "abc"}, r"'feature_width' must be an integer, got 'abc'"),
    ({"local_parameters": {"synth-0": {"last_item_bias": float("nan")}}}, r"\['synth-0.last_item_bias'\] are not finite"),
    ({"local_parameters": {"synth-0": {"last_item_bias": "high"}}}, r"\['synth-0.last_item_bias'\] are not finite"),
    ({"local_parameters": [1.0]}, r"'local_parameters' must map each domain"),
    # read by evaluate, and by the encoder it rebuilds: bare AttributeError / TypeError naming no card before
    ({"eval": None}, r"'eval' must be a table, got None"),
    ({"metrics": None}, r"'metrics' must be a table, got None"),
    ({"eval.split": 3}, r"'eval.split' must be one of \['val', 'test'\], got 3"),
    ({"metrics": {"synth-0": 0.5}}, r"'metrics' must map each domain"),
    ({"encoder.params": {"dim": "x"}}, r"card .*: encoder.params: HashingEncoder: dim must be"),
    ({"encoder.name": "hashin", "encoder.params": {}}, r"model card .*ties.json: unknown text encoder 'hashin'"),
])
def test_a_malformed_card_is_a_data_error_naming_the_field(saved_copy, changes, message):
    _edit_card(saved_copy, **changes)
    with pytest.raises(DataError, match=message):
        load_recommender(saved_copy)


@pytest.mark.parametrize(("changes", "message"), [
    # torch: "expected sequence of length 1 at dim 1 (got 2)"
    ({"local_parameters": {"synth-0": {"final_norm.bias": [[1.0], [1.0, 2.0]]}}},
     r"ties.json: 'local_parameters' \['synth-0.final_norm.bias'\] are ragged"),
    # torch: "int too large to convert to float"
    ({"local_parameters": {"synth-0": {"final_norm.bias": 10**400}}},
     r"ties.json: 'local_parameters' \['synth-0.final_norm.bias'\] are not finite"),
    # numpy: "Maximum allowed size exceeded"
    ({"eval": {"split": "test", "ks": [10, 10**30]}}, r"ties.json: 'eval.ks' \[10{30}\] exceed the largest cut-off"),
])
def test_card_values_torch_or_numpy_cannot_take_are_data_errors_naming_the_field(saved_copy, run, changes, message):
    """These passed the card check and failed in evaluate / recommend with torch's or numpy's message, naming no
    card or field."""
    cfg, _, _, folders = run
    _edit_card(saved_copy, **changes)
    with pytest.raises(DataError, match=message):
        load_recommender(saved_copy, cache_dir=cfg.encoder.cache_dir).evaluate(folders["synth-0"])


def test_local_parameters_that_do_not_fit_the_model_name_the_card(saved_copy, run):
    """A name the model lacks, a shape or a value its dtype cannot hold (1e300 in float32 became inf) were refused
    or taken without naming the card and field."""
    cfg, _, _, folders = run
    model = load_recommender(saved_copy, cache_dir=cfg.encoder.cache_dir)
    width = model.weights["final_norm.bias"].numel()
    field = r"ties.json: 'local_parameters.synth-0.final_norm.bias'"
    for value, message in (([1e300] * width, f"{field}: .*not finite as torch.float32"),
                           ([1.0] * (width + 1), f"{field}: .*value of shape \\({width + 1},\\)")):
        _edit_card(saved_copy, local_parameters={"synth-0": {"final_norm.bias": value}})
        with pytest.raises(DataError, match=message):
            load_recommender(saved_copy, cache_dir=cfg.encoder.cache_dir).evaluate(folders["synth-0"])
    _edit_card(saved_copy, local_parameters={"synth-0": {"nope": 1.0}})
    with pytest.raises(DataError, match=r"ties.json: 'local_parameters.synth-0.nope': .*not a weight of the model"):
        load_recommender(saved_copy, cache_dir=cfg.encoder.cache_dir).for_domain("synth-0")


def test_a_cut_off_beyond_the_bound_is_refused_by_evaluate_and_the_scenario(saved_copy, run, capsys):
    from fedmerge.checks import MAX_CUTOFF
    from fedmerge.config import load_scenario

    cfg, _, _, folders = run
    model = load_recommender(saved_copy, cache_dir=cfg.encoder.cache_dir)
    with pytest.raises(FedmergeError, match=f"ks \\[{MAX_CUTOFF + 1}\\] exceed the largest cut-off {MAX_CUTOFF}"):
        model.evaluate(folders["synth-0"], ks=[5, MAX_CUTOFF + 1])
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", str(saved_copy), "--data", str(folders["synth-0"]), "--ks", f"5,{10**30}"])
    assert exit_info.value.code == 2
    assert f"the largest cut-off is {MAX_CUTOFF}" in capsys.readouterr().err
    with pytest.raises(FedmergeError, match=f"eval.ks \\[{10**30}\\] exceed the largest cut-off {MAX_CUTOFF}"):
        load_scenario("quickstart", [f"eval.ks=[10, {10**30}]"])
    assert f"recall@{MAX_CUTOFF}" in model.evaluate(folders["synth-0"], ks=[MAX_CUTOFF])  # the bound itself runs


def test_scoring_uses_the_encoder_given_to_load(saved_copy, unseen_catalog, tmp_path):
    """The encoder passed to load_recommender (same identity as the card's) is the one that encodes catalogs."""
    card = json.loads(card_path(saved_copy).read_text())
    encoder = HashingEncoder(**card["encoder"]["params"])
    calls = []
    original = encoder.encode
    encoder.encode = lambda texts: calls.append(len(texts)) or original(texts)
    model = load_recommender(saved_copy, encoder=encoder, cache_dir=str(tmp_path / "empty-cache"))
    catalog = load_domain(unseen_catalog).catalog
    model.recommend([list(catalog.ids[:2])], k=3, catalog=catalog)
    assert calls and sum(calls) == len(catalog.ids)



def test_recommend_says_when_the_history_leaves_no_item(run, unseen_catalog, capsys):
    """A history holding every catalog item printed a header and no line, exit 0."""
    cfg, out, _, _ = run
    catalog = load_domain(unseen_catalog).catalog
    args = ["recommend", "--model", str(out / "models" / "ties.safetensors"), "--catalog", str(unseen_catalog),
            "--cache-dir", cfg.encoder.cache_dir, "--history", ",".join(catalog.ids)]
    assert main(args) == 0
    assert "no item left" in capsys.readouterr().out


@pytest.mark.parametrize(("params", "message"), [
    ({"hidden": 32.0}, r"hidden must be an integer, got 32.0"),
    ({"hidden": "32"}, r"hidden must be an integer, got '32'"),
    ({"dropout": "a"}, r"dropout must be a number, got 'a'"),
    ({"adapter": "zzz"}, r"unknown adapter 'zzz'; valid"),
    ({"hidden": -1}, r"parameters must be positive: \{'hidden': -1\}"),
])
def test_bad_family_parameter_values_in_a_card_are_data_errors_naming_the_card(saved_copy, params, message):
    """A card's family.params were only checked to be a table: a float or string hidden size failed inside torch."""
    card = json.loads(card_path(saved_copy).read_text())
    _edit_card(saved_copy, **{"family.params": {**card["family"]["params"], **params}})
    with pytest.raises(DataError, match=rf"model card .*ties.json: model family 'sequential': {message}"):
        load_recommender(saved_copy)


def test_a_missing_model_file_is_named_as_missing(tmp_path):
    with pytest.raises(DataError, match=r"no model file .*nope.safetensors$"):
        load_recommender(tmp_path / "nope.safetensors")
    with pytest.raises(DataError, match=r"no model file .* \(a folder: give a <name>.safetensors file"):
        load_recommender(tmp_path)


def test_histories_are_read_once_and_checked_by_row(run, saved_copy, unseen_catalog):
    cfg, _, _, _ = run
    model = load_recommender(saved_copy, cache_dir=cfg.encoder.cache_dir)
    catalog = load_domain(unseen_catalog).catalog
    texts = [["a red car"], ["a wooden train"]]
    # a generator with texts=True was read twice: the second pass saw nothing and returned []
    assert len(model.recommend((h for h in texts), k=2, catalog=catalog, texts=True)) == 2
    assert model.scores((h for h in texts), catalog=catalog, texts=True).shape == (2, len(catalog))
    with pytest.raises(FedmergeError, match=r"a list of strings .*wrap a single history as \[history\]"):
        model.recommend(list(catalog.ids[:2]), k=2, catalog=catalog)
    with pytest.raises(FedmergeError, match="the history at index 1 is empty"):
        model.recommend([list(catalog.ids[:1]), []], k=2, catalog=catalog)
    for k in (2.5, "5", None, True, 0):
        with pytest.raises(FedmergeError, match="k must be an integer of at least 1"):
            model.recommend([list(catalog.ids[:1])], k=k, catalog=catalog)
    domain = load_domain(unseen_catalog)
    by_domain = model.recommend([list(catalog.ids[:1])], k=3, catalog=domain)
    assert by_domain == model.recommend([list(catalog.ids[:1])], k=3, catalog=catalog)
    with pytest.raises(FedmergeError, match="catalog must be an ItemCatalog, a Domain or a domain folder"):
        model.recommend([list(catalog.ids[:1])], k=3, catalog=42)


def test_a_histories_file_with_no_history_or_not_utf8_is_named(run, saved_copy, unseen_catalog, tmp_path, capsys):
    """Blank lines only printed nothing and exited 0; a Latin-1 file failed with a codec error naming no file."""
    args = ["recommend", "--model", str(saved_copy), "--catalog", str(unseen_catalog), "--cache-dir",
            run[0].encoder.cache_dir, "--histories"]
    blank, latin = tmp_path / "blank.txt", tmp_path / "latin.txt"
    blank.write_text("\n  \n")
    latin.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    assert main([*args, str(blank)]) == 1
    assert f"--histories {blank} holds no history" in capsys.readouterr().err
    assert main([*args, str(latin)]) == 1
    assert f"--histories {latin}: not UTF-8 text" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt: cannot read it (No such file or directory)" in capsys.readouterr().err


def test_a_catalog_with_an_id_twice_is_refused():
    """One built in Python (the file loaders refuse it) mapped the id to its last index: recommend returned the
    history's own item."""
    from fedmerge.data import ItemCatalog

    with pytest.raises(DataError, match=r"catalog lists 1 item id\(s\) more than once, e.g. \['a'\]"):
        ItemCatalog(ids=("a", "b", "a"), fields=({"title": "hello"}, {"title": "world"}, {"title": "foo"}))


def test_evaluate_takes_a_path_defaults_to_the_cards_split_and_checks_ks(run, saved_copy):
    cfg, _, results, folders = run
    domain = next(iter(folders))
    model = load_recommender(saved_copy, cache_dir=cfg.encoder.cache_dir)
    assert model.default_split == "test"
    assert model.evaluate(folders[domain]) == model.evaluate(load_domain(folders[domain]), split="test")
    _edit_card(saved_copy, eval={"split": "val"})
    val_model = load_recommender(saved_copy, cache_dir=cfg.encoder.cache_dir)
    assert val_model.evaluate(folders[domain]) == model.evaluate(folders[domain], split="val")
    with pytest.raises(FedmergeError, match="ks must be a non-empty list of positive integers"):
        model.evaluate(folders[domain], ks=[0])
    # a generator of cut-offs was consumed by the check and left no metric at all
    assert model.evaluate(folders[domain], ks=(k for k in (5, 10))) == model.evaluate(folders[domain], ks=[5, 10])
    assert "recall@10" in model.evaluate(folders[domain], ks=10)
    with pytest.raises(FedmergeError, match="evaluate needs a Domain or a domain folder/tarball path, got ItemCatalog"):
        model.evaluate(load_domain(folders[domain]).catalog)
    with pytest.raises(FedmergeError, match="split must be 'test' or 'val', got 'train'"):  # was a bare ValueError
        model.evaluate(folders[domain], split="train")


def test_evaluate_reports_the_cut_offs_the_run_reported_unless_told(run, saved_copy, capsys):
    """The card's eval.ks was ignored: a run with eval.ks = [1, 3] was re-evaluated at K = 5/10/20/50, none of the
    card's metrics."""
    cfg, _, _, folders = run
    domain = next(iter(folders))
    _edit_card(saved_copy, eval={"split": "test", "ks": [1, 3]})
    metrics = load_recommender(saved_copy, cache_dir=cfg.encoder.cache_dir).evaluate(folders[domain])
    assert sorted(k for k in metrics if k.startswith("recall@") and "_" not in k) == ["recall@1", "recall@3"]
    args = ["evaluate", "--model", str(saved_copy), "--data", str(folders[domain]), "--json"]
    assert main(args) == 0 and "recall@3" in json.loads(capsys.readouterr().out)["metrics"]
    assert main([*args, "--ks", "7"]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["metrics"]) == sorted(
        ["users", "recall@7", "ndcg@7", "recall@7_masked", "ndcg@7_masked"])
    _edit_card(saved_copy, eval={"split": "test", "ks": "x"})
    with pytest.raises(DataError, match=r"'eval.ks' must be a non-empty list of positive integers, got 'x'"):
        load_recommender(saved_copy)


def test_non_finite_weights_are_refused_by_recommend_scores_and_evaluate(run, saved_copy, unseen_catalog):
    """recommend refused them; scores returned NaNs and evaluate raised a bare ValueError that named no model."""
    import dataclasses

    cfg, _, _, folders = run
    model = load_recommender(saved_copy, cache_dir=cfg.encoder.cache_dir)
    broken = dataclasses.replace(model, weights={n: torch.full_like(t, float("nan")) for n, t in model.weights.items()})
    catalog = load_domain(unseen_catalog).catalog
    with pytest.raises(FedmergeError, match="non-finite scores"):
        broken.recommend([list(catalog.ids[:2])], k=3, catalog=catalog)
    with pytest.raises(FedmergeError, match="non-finite scores"):
        broken.scores([list(catalog.ids[:2])], catalog=catalog)
    with pytest.raises(FedmergeError, match="non-finite scores"):
        broken.evaluate(next(iter(folders.values())))


def test_a_loaded_model_has_a_short_repr_and_a_wrong_encoder_argument_is_named(saved_copy):
    model = load_recommender(saved_copy)
    assert repr(model).startswith("LoadedRecommender(name='ties', family='sequential'") and len(repr(model)) < 300
    with pytest.raises(FedmergeError, match="encoder must be a text encoder object"):
        load_recommender(saved_copy, encoder="minilm")
    import fedmerge

    assert "load_recommender" in dir(fedmerge)


def test_evaluate_warns_when_the_data_is_not_the_runs(run, saved_copy, tmp_path, caplog):
    """`fedmerge data synth` with its default sizes writes domains named like the run's but with other users:
    evaluate gave other numbers silently."""
    cfg, _, _, folders = run
    name = next(iter(folders))
    other = make_synthetic_domains(n_domains=1, n_users=45, n_items=20, seed=5)[0]
    folder = save_generic_domain(other, tmp_path / name)
    model = load_recommender(saved_copy, cache_dir=cfg.encoder.cache_dir)
    with caplog.at_level("WARNING", logger="fedmerge.recommender"):
        model.evaluate(folders[name])
        assert not caplog.records
        model.evaluate(load_domain(folder, name))
    assert f"the run evaluated domain '{name}' on" in caplog.text and "not the run's data" in caplog.text


def test_evaluate_compares_the_files_with_the_digests_the_run_recorded(run, tmp_path, caplog):
    """Data with the run's number of test users but other interactions passed the users check silently: a run on
    data files records their sha256 (data_digests.json), and evaluating its model on a folder compares them."""
    cfg, _, _, folders = run
    data = tmp_path / "data"
    for name, folder in folders.items():
        shutil.copytree(folder, data / name)
    own = load_scenario("quickstart", [*TINY, METHODS, f"encoder.cache_dir={cfg.encoder.cache_dir}",
                                       'data.source="generic"', f'data.root="{data}"', "baselines.fedavg_rounds=0",
                                       f"data.domains={json.dumps(sorted(folders))}", "baselines.joint=false"])
    from fedmerge.runners.simulation import run_scenario

    run_scenario(own, "inprocess", tmp_path / "run")
    name = next(iter(folders))
    model = load_recommender(tmp_path / "run" / "models" / "ties.safetensors", cache_dir=cfg.encoder.cache_dir)
    with caplog.at_level("WARNING", logger="fedmerge.recommender"):
        model.evaluate(data / name)
    assert not caplog.records
    csv_file = data / name / "interactions.csv"
    header, first, *rest = csv_file.read_text().splitlines(keepends=True)
    user, item, stamp = first.strip().split(",")
    csv_file.write_text("".join([header, f"{user},{item},{float(stamp) - 0.5}\n", *rest]))  # same users, new file
    with caplog.at_level("WARNING", logger="fedmerge.recommender"):
        model.evaluate(data / name)
    assert f"the files of domain '{name}' differ from those the run recorded" in caplog.text
    caplog.clear()  # `fedmerge evaluate` loads the domain itself and passed only the Domain: nothing was compared
    with caplog.at_level("WARNING", logger="fedmerge.recommender"):
        assert main(["evaluate", "--model", str(tmp_path / "run" / "models" / "ties.safetensors"), "--data",
                     str(data / name), "--cache-dir", cfg.encoder.cache_dir, "--json"]) == 0
    assert f"the files of domain '{name}' differ from those the run recorded" in caplog.text


def test_a_history_longer_than_the_model_reads_is_said_to_be_cut(run, saved_copy, unseen_catalog, caplog):
    """Only the last max_len items of a history are scored (text-LAE fits on whole histories, so "as in training"
    was not true of it): the caller is told instead of the older items being dropped silently."""
    cfg, _, _, _ = run
    model = load_recommender(saved_copy, cache_dir=cfg.encoder.cache_dir)
    catalog = load_domain(unseen_catalog).catalog
    max_len = model.family.max_len
    long, short = list(catalog.ids[: max_len + 3]), list(catalog.ids[:max_len])
    with caplog.at_level("WARNING", logger="fedmerge.recommender"):
        model.scores([short], catalog=catalog)
    assert "longer than the" not in caplog.text
    with caplog.at_level("WARNING", logger="fedmerge.recommender"):
        cut = model.scores([short, long], catalog=catalog)
    assert f"1 of 2 histories are longer than the {max_len} items the model reads (max_len)" in caplog.text
    np.testing.assert_allclose(cut[1], model.scores([long[-max_len:]], catalog=catalog)[0], rtol=1e-5, atol=1e-6)


def test_fedmerge_merge_of_a_runs_files_is_a_model_evaluate_and_recommend_take(run, tmp_path, capsys):
    """`fedmerge merge` wrote weights without a card, so load_recommender / evaluate / recommend refused its output;
    with θ₀'s card beside θ₀ the merge gets one, and re-merging the run's clients reproduces the run's figures."""
    cfg, out, results, _ = run
    clients = [f"{d}={out / 'clients' / f'{d}.safetensors'}" for d in results["domains"]]
    merged = tmp_path / "mine_ties.safetensors"
    assert main(["merge", "--method", "ties", "--theta0", str(out / "models" / "theta0.safetensors"),
                 "--models", *clients, "--out", str(merged)]) == 0
    card = read_card(merged)
    from fedmerge.recommender import COMMON_CARD_KEYS  # what a merge copies of θ₀'s card: every shared field

    assert set(scenario_card(cfg, "digest")) == {*COMMON_CARD_KEYS, "versions"}
    assert {k: card[k] for k in COMMON_CARD_KEYS} == {k: read_card(out / "models" / "theta0.safetensors")[k]
                                                      for k in COMMON_CARD_KEYS}
    assert card["name"] == "mine_ties" and card["method"] == {"name": "ties", "params": {
        "density": 0.2, "scale": 1.0, "scope": "tensor"}} and card["domains"] == results["domains"]
    model = load_recommender(merged, cache_dir=cfg.encoder.cache_dir)
    domain = cfg.load_domain("synth-1")
    assert model.evaluate(domain) == results["models"]["ties"]["synth-1"]
    # a client trained from another θ₀ is refused (its task vector would be measured from the wrong weights)
    other = tmp_path / "other.safetensors"
    shutil.copy(out / "clients" / "synth-0.safetensors", other)
    shutil.copy(card_path(out / "clients" / "synth-0.safetensors"), card_path(other))
    stale = {**read_card(other), "theta0_digest": "0" * 16}
    card_path(other).write_text(json.dumps(stale))
    assert main(["merge", "--method", "ties", "--theta0", str(out / "models" / "theta0.safetensors"),
                 "--models", f"A={other}", *clients[1:], "--out", str(tmp_path / "bad.safetensors")]) == 1
    assert "was trained from θ₀ 0000000000000000" in capsys.readouterr().err
    # ... also when θ₀ comes without a card (its digest is computed from its weights)
    bare = tmp_path / "bare_theta0.safetensors"
    shutil.copy(out / "models" / "theta0.safetensors", bare)
    assert main(["merge", "--method", "ties", "--theta0", str(bare), "--models", f"A={other}", *clients[1:],
                 "--out", str(tmp_path / "bad2.safetensors")]) == 1
    assert "was trained from θ₀ 0000000000000000" in capsys.readouterr().err
    # the card is written beside --out: a file there that is not an earlier merge's card (a run's results.json,
    # θ₀'s card) was overwritten, --overwrite or not
    copied = tmp_path / "copied_run"
    shutil.copytree(out, copied)
    before = (copied / "results.json").read_text()
    for target, message in ((copied / "results.safetensors", "results.json exists and was not written by fedmerge merge"),
                            (copied / "models" / "theta0.bin", "must be a .safetensors file")):
        assert main(["merge", "--method", "ties", "--theta0", str(copied / "models" / "theta0.safetensors"),
                     "--models", *clients, "--out", str(target), "--overwrite"]) == 1
        assert message in capsys.readouterr().err
    assert (copied / "results.json").read_text() == before
    # --overwrite replaces only what fedmerge merge wrote: not a client's weights and card
    assert main(["merge", "--method", "ties", "--theta0", str(copied / "models" / "theta0.safetensors"),
                 "--models", *clients[:2], "--out", str(copied / "clients" / "synth-2.safetensors"),
                 "--overwrite"]) == 1
    assert "was not written by fedmerge merge" in capsys.readouterr().err
    # --overwrite with a θ₀ without a card removes the earlier merge's card (it described other weights)
    assert main(["merge", "--method", "average", "--theta0", str(bare), "--models", *clients, "--out", str(merged),
                 "--overwrite"]) == 0
    assert not card_path(merged).exists() and "θ₀ has no model card" in capsys.readouterr().out


def test_fedmerge_merge_refuses_what_the_run_refused_and_cards_that_describe_other_weights(run, tmp_path, capsys):
    """`fedmerge merge` of a run's clients/ merged an update the run's norm test had rejected (its card says so) with
    exit 0, trusted a card beside another file's weights, and named nothing on a θ₀ card whose `run` was no table."""
    from fedmerge.recommender import update_card
    from fedmerge.storage import load_weights, save_weights

    cfg, out, results, _ = run
    copied = tmp_path / "clients"
    shutil.copytree(out / "clients", copied)
    theta0 = out / "models" / "theta0.safetensors"
    clients = [f"{d}={copied / f'{d}.safetensors'}" for d in results["domains"]]
    update_card(copied / "synth-0.safetensors", rejected="task-vector norm 9.9 exceeds 3 × 1.0")
    args = ["merge", "--method", "average", "--theta0", str(theta0), "--models", *clients]
    assert main([*args, "--out", str(tmp_path / "a.safetensors")]) == 1
    assert ("model synth-0 (" in (err := capsys.readouterr().err) and "the run rejected it (task-vector norm 9.9 "
            "exceeds 3 × 1.0); pass --include-rejected to merge it anyway" in err)
    assert main([*args, "--out", str(tmp_path / "a.safetensors"), "--include-rejected"]) == 0
    capsys.readouterr()
    # a card beside weights it does not describe (another client's file copied over) is refused
    save_weights(copied / "synth-1.safetensors", load_weights(copied / "synth-2.safetensors"))
    assert main([*args, "--include-rejected", "--out", str(tmp_path / "b.safetensors")]) == 1
    assert "does not hold the weights its card" in capsys.readouterr().err
    # a θ₀ card whose run is no table, or whose seed is no integer, is named
    bad_theta0 = tmp_path / "theta0.safetensors"
    shutil.copy(theta0, bad_theta0)
    for run_field in ("x", {"seed": "abc"}, {"seed": 1.7}, {"seed": -5}):
        card_path(bad_theta0).write_text(json.dumps({**read_card(theta0), "run": run_field}))
        assert main(["merge", "--method", "dare", "--theta0", str(bad_theta0), "--models", *clients[2:],
                     "--out", str(tmp_path / "c.safetensors")]) == 1
        assert f"{card_path(bad_theta0)}: run.seed must be an integer in [0, 2**63)" in capsys.readouterr().err


def test_a_bundle_without_git_records_the_launchers_commit_only_for_the_same_source(monkeypatch):
    """Flower runs the ServerApp from its unpacked app bundle, which has no .git: the commit the launcher read from its
    checkout is recorded when the bundle's source digest is the launcher's, and named as another code's otherwise."""
    from fedmerge import provenance

    monkeypatch.setattr(provenance, "source_commit", lambda: "not a git checkout (installed package)")
    monkeypatch.setattr(provenance, "source_digest", lambda: "0123456789abcdef")
    assert provenance.package_versions()["fedmerge_commit"] == "not a git checkout (installed package)"
    monkeypatch.setattr(provenance, "_launcher_source", None)
    provenance.adopt_launcher_source(("a" * 40, "0123456789abcdef"))
    same = provenance.package_versions()
    assert same["fedmerge_commit"] == "a" * 40 and same["fedmerge_source"] == "0123456789abcdef"
    # every record the process writes carries it: results.json's versions and the model cards'
    assert scenario_card(load_scenario("quickstart", TINY), "0" * 16)["versions"]["fedmerge_commit"] == "a" * 40
    provenance.adopt_launcher_source(("a" * 40, "fedcba9876543210"))
    other = provenance.package_versions()["fedmerge_commit"]
    assert other.startswith("not a git checkout") and "a" * 40 in other and "fedcba9876543210" in other
    monkeypatch.setattr(provenance, "source_commit", lambda: "b" * 40)  # a checkout's own commit wins
    assert provenance.package_versions()["fedmerge_commit"] == "b" * 40


def test_a_cards_encoder_runs_on_this_machines_device():
    """The device a model was trained with went onto its card and was used again: a card from a CUDA run could not
    encode a new catalog on a CPU machine (the device is not part of the encoder's identity)."""
    from fedmerge.recommender import card_encoder

    card = {"encoder": {"name": "minilm", "params": {"device": "cuda", "max_length": 32}}}
    assert card_encoder(card).params == {"max_length": 32}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_cuda_encoder_device_without_cuda_is_named_before_the_model_loads():
    from fedmerge.text import SentenceEncoder

    with pytest.raises(FedmergeError, match=r"text encoder device 'cuda' \(encoder.params.device\): torch sees no CUDA"):
        SentenceEncoder(device="cuda", progress=False).encode(["a text"])


def _saved_sequential(tmp_path: Path, n_items: int = 40, **params) -> tuple:
    """θ₀ of a small sequential family (``params`` on top) over the hashing encoder, its card, a synthetic domain's
    catalog and the encoder settings: (weights, card, catalog, encoder)."""
    from fedmerge.models import get_family
    from fedmerge.recommender import common_card, model_card
    from fedmerge.scenario import EncoderSettings

    domain = make_synthetic_domains(n_domains=1, n_users=20, n_items=n_items, seed=5)[0]
    encoder = EncoderSettings("hashing", {"dim": 32}, str(tmp_path / "cache"))
    family = get_family("sequential", hidden=16, n_layers=1, max_len=10, **params)
    weights = family.initial_weights(family.feature_width(32), 0)
    card = model_card(common_card(family, encoder, weights_digest(weights), {"name": "t", "seed": 0}, "test", (10,)),
                      "m", "theta0", {}, [domain.name])
    return weights, card, domain.catalog, encoder


def _load_small(tmp_path: Path, weights, card, encoder):
    path = save_model(tmp_path / "m.safetensors", weights, card)
    return load_recommender(path, cache_dir=encoder.cache_dir)


def _recording_scorer(model, monkeypatch) -> list[tuple[int, int]]:
    """(catalog rows the scorer was built over, histories per call) of every call of the loaded family's scorer."""
    calls: list[tuple[int, int]] = []
    scorer = model.family.scorer

    def recording(weights, features, *args, **kwargs):
        inner = scorer(weights, features, *args, **kwargs)

        def score(seqs):
            calls.append((int(features.shape[0]), len(seqs)))
            return inner(seqs)

        return score

    monkeypatch.setattr(model.family, "scorer", recording)
    return calls


def test_histories_of_texts_are_scored_in_chunks_of_bounded_size(tmp_path, monkeypatch):
    """With texts=True every text of every history in the call joined one catalog: the scorer built a histories ×
    (catalog + all the call's texts) matrix, O(U²·H) memory (4,000 histories of 10 texts over 100 items: 806 MiB,
    15 MiB by ids); only the CLI chunked its input."""
    from fedmerge.recommender import HISTORY_BATCH

    weights, card, catalog, encoder = _saved_sequential(tmp_path)
    model = _load_small(tmp_path, weights, card, encoder)
    n, length = len(catalog), 3
    histories = [[f"a note {u}.{j} of no catalog item" for j in range(length)] for u in range(2 * HISTORY_BATCH + 5)]
    calls = _recording_scorer(model, monkeypatch)
    scores = model.scores(histories, catalog, texts=True)
    assert scores.shape == (len(histories), n)
    assert len(calls) == 3  # one scorer per chunk of HISTORY_BATCH histories, over the catalog and that chunk's texts
    assert all(rows <= n + HISTORY_BATCH * length and users <= HISTORY_BATCH for rows, users in calls)
    calls.clear()
    recs = model.recommend(histories, k=4, catalog=catalog, texts=True)
    assert len(calls) == 3
    assert all(rows <= n + HISTORY_BATCH * length and users <= HISTORY_BATCH for rows, users in calls)
    # a history scores as it does alone in whichever chunk it falls: each chunk's statistics are the catalog's own
    for u in (0, HISTORY_BATCH - 1, HISTORY_BATCH, len(histories) - 1):
        alone = model.scores([histories[u]], catalog, texts=True)[0]
        np.testing.assert_allclose(scores[u], alone, rtol=1e-5, atol=1e-6)
        assert [r.index for r in recs[u]] == list(np.lexsort((np.arange(n), -alone))[:4])


def test_history_texts_of_catalog_items_get_the_learned_history_offsets(tmp_path, monkeypatch):
    """With texts=True every history text was an extra item after the catalog, so the learned offsets of the last
    item (b), of earlier items (b_h) and of repeating users landed on columns that were sliced off: the item whose
    text a user gave was scored without them (b = −0.5: rank 5 by id, rank 1 by text)."""
    from fedmerge.recommender import LoadedRecommender

    weights, card, catalog, encoder = _saved_sequential(tmp_path, last_item_bias=True, history_bias=True,
                                                        repeat_user_bias=True)
    offsets = {"last_item_bias": torch.tensor(-0.5), "history_bias": torch.tensor(0.3),
               "repeat_user_bias": torch.tensor([0.2, -0.4])}
    weights = {**weights, **offsets}
    card = {**card, "weights_digest": weights_digest(weights)}
    model = _load_small(tmp_path, weights, card, encoder)
    texts, ids = catalog.texts(), catalog.ids
    rows = [(3, 7, 11), (3, 7, 3), (5, 9)]
    by_ids = model.scores([[ids[i] for i in r] for r in rows], catalog)
    # a text is read as the catalog item whose full text or title it is, letter case and white space aside
    given = [[texts[i] for i in rows[0]], [texts[i] for i in rows[1]],
             [f" {catalog.fields[5]['title'].upper()}", "  ".join(texts[9].split())]]
    np.testing.assert_allclose(model.scores(given, catalog, texts=True), by_ids, rtol=1e-5, atol=1e-5)
    recs_ids = model.recommend([[ids[i] for i in r] for r in rows], k=5, catalog=catalog, exclude_history=False)
    recs_texts = model.recommend(given, k=5, catalog=catalog, texts=True, exclude_history=False)
    assert [[r.item for r in recs] for recs in recs_texts] == [[r.item for r in recs] for recs in recs_ids]
    # a text of no catalog item stays an extra item (one per distinct text); the catalog items around it get their
    # offsets: the scores move by exactly b/τ at the last item and b_h/τ at the earlier one against zero offsets
    zero = {**weights, **{k: torch.zeros_like(v) for k, v in offsets.items()}}
    plain = LoadedRecommender(model.path, model.card, model.family, zero, model.encoder, model.cache_dir)
    mixed = [[texts[3], "a note of no catalog item", texts[11]]]
    without = plain.scores(mixed, catalog, texts=True)[0]
    calls = _recording_scorer(model, monkeypatch)
    moved = model.scores(mixed + [["a note of no catalog item"] * 2], catalog, texts=True)[0] - without
    assert calls == [(len(catalog) + 1, 2)]  # the catalog and the one distinct text of no catalog item
    tau = model.family.temperature
    expected = np.zeros(len(catalog))
    expected[11], expected[3] = -0.5 / tau, 0.3 / tau
    np.testing.assert_allclose(moved, expected, atol=1e-4)


def test_a_model_saved_by_a_cuda_run_loads_and_scores_on_this_machines_device(tmp_path):
    """The card keeps every family parameter, the training device included, and loading rebuilt the family with it:
    a model of a run with model.params.device = "cuda" failed to score on a CPU-only machine ("Torch not compiled
    with CUDA enabled"). The card's encoder device was already left out (card_encoder)."""
    from fedmerge.models.sequential import SequentialFamily

    weights, card, catalog, encoder = _saved_sequential(tmp_path, device="cuda")
    assert card["family"]["params"]["device"] == "cuda"
    model = _load_small(tmp_path, weights, card, encoder)
    assert model.family.resolved_device() == SequentialFamily().resolved_device()  # this machine's default
    assert read_card(model.path)["family"]["params"]["device"] == "cuda"  # the card, and its digest, as written
    plain = {**card, "family": {**card["family"], "params": {**card["family"]["params"], "device": None}}}
    (tmp_path / "plain").mkdir()
    expected = _load_small(tmp_path / "plain", weights, plain, encoder).scores([list(catalog.ids[:3])], catalog)
    np.testing.assert_array_equal(model.scores([list(catalog.ids[:3])], catalog), expected)
    assert len(model.recommend([list(catalog.ids[:3])], k=3, catalog=catalog)[0]) == 3
