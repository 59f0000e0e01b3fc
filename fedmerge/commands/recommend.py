"""``fedmerge recommend``: top-K items of any catalog for one history or a file of histories, from a saved model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmerge.errors import DataError

if TYPE_CHECKING:
    from fedmerge.recommender import LoadedRecommender


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recommend", help="recommend items of a catalog from a saved model (any catalog, also one never trained on)",
        description="Loads a model saved by a run (<run>/models/<name>.safetensors or <run>/clients/<domain>"
        ".safetensors, with its .json card), encodes the catalog's item texts with the model's own encoder (through "
        "the embedding cache) and prints the top-K items for each history. Items of the history are left out "
        "(with --texts: the catalog items whose text is one of the history's).",
    )
    add_saved_model_options(parser)
    parser.add_argument("--catalog", type=Path, required=True, help="domain folder or .tar.gz whose items to rank")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--history", help="one history, oldest first: ID,ID,... (item ids of the catalog); with "
                        "--texts a JSON list of item texts")
    source.add_argument("--histories", type=Path, metavar="FILE",
                        help="one history per line (ID,ID,... or a JSON list); writes one JSON line per history")
    parser.add_argument("-k", type=int, default=10, help="items to recommend (default 10)")
    parser.add_argument("--texts", action="store_true",
                        help="history entries are item texts (JSON lists in --histories), not catalog ids")
    parser.add_argument("--include-history", action="store_true", help="may recommend items of the history")
    parser.add_argument("--json", action="store_true", help="print JSON (the batch form always writes JSON lines)")
    parser.set_defaults(func=run_recommend)


def add_saved_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--cache-dir`` and ``--as-domain``: the options of every command that loads a saved model
    (:func:`load_saved_model`)."""
    parser.add_argument("--model", type=Path, required=True, help="saved model (.safetensors with its .json card)")
    parser.add_argument("--cache-dir", default="", help="embedding cache folder (default: the default cache)")
    parser.add_argument("--as-domain", default="", metavar="NAME",
                        help="serve the model as training domain NAME does, with its own local parameters from the "
                        "card (merge.local_parameters); evaluate defaults to the data's domain name, recommend to "
                        "the shared values")


def load_saved_model(args: argparse.Namespace) -> LoadedRecommender:
    """The model of :func:`add_saved_model_options`' arguments, served as ``--as-domain`` when given."""
    from fedmerge.recommender import load_recommender

    model = load_recommender(args.model, cache_dir=args.cache_dir)
    return model.served_as(args.as_domain) if args.as_domain else model


def parse_history(line: str, texts: bool, where: str) -> list[str]:
    """A history from ``ID,ID,...`` or a JSON list of strings (required for texts, which may hold commas)."""
    line = line.strip()
    if line.startswith("["):
        try:
            items = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not a JSON list: {exc}") from exc
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise DataError(f"{where}: expected a JSON list of strings")
    elif texts:
        raise DataError(f"{where}: with --texts, give each history as a JSON list of item texts")
    else:
        items = [i.strip() for i in line.split(",") if i.strip()]
    if not items:
        raise DataError(f"{where}: empty history")
    empty = [j for j, text in enumerate(items) if texts and not text.strip()]
    if empty:
        raise DataError(f"{where}: entry {empty[0]} is an empty item text")
    return items


def run_recommend(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from fedmerge.data import load_catalog
    from fedmerge.recommender import HISTORY_BATCH  # histories per printed batch: the chunk recommend scores at once

    model = load_saved_model(args)
    catalog = load_catalog(args.catalog)
    options: dict[str, Any] = {"k": args.k, "catalog": catalog, "texts": args.texts,
                               "exclude_history": not args.include_history}
    if args.history is not None:
        history = parse_history(args.history, args.texts, "--history")
        (recs,) = model.recommend([history], **options)
        if args.json:
            print(json.dumps({"model": model.name, "history": history, "recommendations": _rows(recs, catalog)}))
        else:
            print(f"top {len(recs)} of {len(catalog)} items by {model.name} ({args.model}):")
            for rank, row in enumerate(_rows(recs, catalog), 1):
                print(f"{rank:>3}  {row['item']:<16}  {row['score']:9.4f}  {row['title']}")
            if not recs:
                print("no item left: the history holds every item of the catalog (--include-history ranks them too)")
        return 0
    try:
        text = args.histories.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:  # a bare "'utf-8' codec can't decode byte 0xe9" named no file
        raise DataError(f"--histories {args.histories}: not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise DataError(f"--histories {args.histories}: cannot read it ({exc.strerror or exc})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:  # printed nothing and exited 0; an empty --history is refused
        raise DataError(f"--histories {args.histories} holds no history (one per line: item ids, comma-separated, "
                        "or a JSON list)")
    histories = [parse_history(line, args.texts, f"{args.histories}:{n}") for n, line in lines]
    if not args.texts:  # every id checked before the first line is printed: no partial output on a bad later line
        known = set(catalog.ids)
        unknown = [f"{args.histories}:{n}: {item!r}" for (n, _), history in zip(lines, histories)
                   for item in history if item not in known]
        if unknown:
            raise DataError(f"{len(unknown)} item id(s) not in the catalog {args.catalog}, e.g. {unknown[:5]}; "
                            "nothing was recommended")
    with tqdm(total=len(histories), desc="recommend", unit="history", file=sys.stderr) as bar:
        for start in range(0, len(histories), HISTORY_BATCH):
            chunk = histories[start : start + HISTORY_BATCH]
            numbers = [n for n, _ in lines[start : start + HISTORY_BATCH]]
            for number, history, recs in zip(numbers, chunk, model.recommend(chunk, **options)):
                print(json.dumps({"line": number, "history": history, "recommendations": _rows(recs, catalog)}))
            bar.update(len(chunk))
    return 0


def _rows(recs: list[Any], catalog: Any) -> list[dict[str, Any]]:
    return [{"item": r.item, "score": round(r.score, 6), "title": str(catalog.fields[r.index].get("title", ""))}
            for r in recs]
