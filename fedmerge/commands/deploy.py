"""``fedmerge deploy``: local test PKI (``certs``) and a real multi-process run on loopback (``local``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedmerge.commands import json_on_failure, positive_seconds
from fedmerge.config import DEFAULT_SCENARIO
from fedmerge.deploy.certs import DEFAULT_HOSTS, generate
from fedmerge.runners.results import RESULTS_FILE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("deploy", help="TLS certificates and real SuperLink/SuperNode runs")
    actions = parser.add_subparsers(dest="deploy_command", metavar="ACTION", required=True)

    certs = actions.add_parser("certs", help="own CA, SuperLink server certificate and SuperNode auth key pairs")
    certs.add_argument("--out", type=Path, required=True, help="folder receiving ca.crt, server.crt/.key, nodes/")
    certs.add_argument("--nodes", type=int, default=3, help="number of SuperNode key pairs (default 3)")
    certs.add_argument("--host", action="append", dest="hosts",
                       help=f"server certificate host name or IP (repeatable; {', '.join(DEFAULT_HOSTS)} are always "
                       "added: the SuperLink connects to itself over TLS on the loopback)")
    certs.add_argument("--days", type=int, default=30, help="validity of the CA and server certificates (default 30)")
    certs.add_argument("--ca", type=Path, metavar="DIR",
                       help="sign with the CA in DIR (ca.crt + ca.key, e.g. an earlier --out kept offline): --out "
                       "gets a copy of its ca.crt and no ca.key, so SuperNodes keep trusting the same CA")
    certs.add_argument("--force", action="store_true",
                       help="replace certificates already in --out (the CA too unless --ca: every SuperNode then "
                       "needs the new ca.crt)")
    certs.set_defaults(func=run_certs)

    local = actions.add_parser(
        "local", help="SuperLink + one SuperNode per domain on 127.0.0.1 over TLS with node authentication"
    )
    local.add_argument("--scenario", default=DEFAULT_SCENARIO,
                       help=f"scenario name or TOML path (default {DEFAULT_SCENARIO})")
    local.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                       help="scenario override, e.g. --set model.params.max_epochs=1 (repeatable)")
    local.add_argument("--data-root", type=Path,
                       help="folder with one <domain>/ or <domain>.tar.gz per SuperNode, also where the ServerApp "
                       "reads the public catalogs (synthetic: optional)")
    local.add_argument("--tls-dir", type=Path, help="PKI from `fedmerge deploy certs` (default: a fresh one in --out)")
    local.add_argument("--out", type=Path, required=True,
                       help="output folder: results/, logs/, tls/ (unless --tls-dir), processes.json, deployment.json, "
                       "scenario.toml (the resolved scenario), data/ (synthetic domains), flwr-home/, superlink.db")
    local.add_argument("--timeout", type=positive_seconds, default=3600.0,
                       help="seconds to wait for the run, a finite number > 0 (default 3600)")
    local.add_argument("--overwrite", action="store_true",
                       help="delete what an earlier deployment left in --out; a non-empty --out is refused otherwise, "
                       "and a folder no fedmerge run held (no .fedmerge.lock) whatever the flags")
    local.add_argument("--json", action="store_true",
                       help="print exactly one JSON object (status, results path, warnings) instead of the tables; on "
                       "failure status \"failed\", the error and the results path if the run wrote one (non-zero exit code)")
    local.set_defaults(func=run_local)


def run_certs(args: argparse.Namespace) -> int:
    files = generate(args.out, args.nodes, tuple(args.hosts or DEFAULT_HOSTS), overwrite=args.force, days=args.days,
                     ca=args.ca)
    print(f"CA certificate      {files.ca_cert}  (give to SuperNodes and flwr: --root-certificates)")
    if args.ca is None:
        print(f"CA private key      {files.ca_key}  (signs certificates: keep it offline, not on the SuperLink)")
    print(f"server certificate  {files.server_cert}  key {files.server_key}")
    for keys in files.nodes:
        print(f"SuperNode key       {keys.private_key}  public {keys.public_key}")
    return 0


def run_local(args: argparse.Namespace) -> int:
    from fedmerge.deploy.local import deploy_local
    from fedmerge.runners.results import run_summary

    path = args.out / "results" / RESULTS_FILE
    with json_on_failure(args.json, path):
        results = deploy_local(args.scenario, args.out, overrides=args.overrides, data_root=args.data_root,
                               tls_dir=args.tls_dir, timeout_s=args.timeout, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"status": results.get("status"), "results": str(path),
                          "warnings": results.get("warnings", [])}))
        return 0
    print(run_summary(results, results.get("config", {}).get("eval", {}).get("primary", "recall@10")))
    print(f"results: {path} (logs: {args.out / 'logs'})")
    return 0
