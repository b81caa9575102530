"""``cspine models``: the model version sets of a repository, and which one Triton serves."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cspine.config import Settings


def cmd_models_list(args: argparse.Namespace) -> int:
    from cspine.cohort.versions import MODEL_CARD
    from cspine.inference.model_config import available_sets, served_set, version_file

    repository = Path(args.repository)
    served = served_set(repository)
    rows: list[dict] = []
    for version in available_sets(repository):
        card_path = version_file(repository, MODEL_CARD, version)
        rows.append(
            {
                "version": version,
                "served": version == served,
                "model_card": json.loads(card_path.read_text()) if card_path.exists() else None,
            }
        )
    if args.json:
        print(json.dumps({"served": served, "versions": rows}, indent=2))
        return 0
    for row in rows:
        card: dict | None = row["model_card"]
        if card is None:
            what = "the shipped models, trained on SYNTHETIC phantom data (model_repository/README.md)"
        else:
            tuned = ", ".join(card["fine_tuned"]) or "none"
            what = f"from version {card['base_version']}, fine-tuned ({tuned}) on the cohort {card['cohort']['name']}"
        print(f"{'*' if row['served'] else ' '} {row['version']}: {what}")
    print("(* served)")
    return 0


def cmd_models_use(args: argparse.Namespace) -> int:
    from cspine.errors import CspineError
    from cspine.inference.model_config import available_sets, model_versions, serve_every_version, use_version

    repository = Path(args.repository)
    if args.version == "all":
        changed = serve_every_version(repository)
        sets = ", ".join(map(str, available_sets(repository)))
        print(
            f"every version set ({sets}) is named in the repository ({len(changed)} configs changed): a Triton "
            "over it loads them all, for cspine gateways that each ask for their own set (CSPINE_TRITON_PIN_VERSIONS)"
        )
        return 0
    if not args.version.isdigit():
        raise CspineError(f"a version set is a number, or all; got {args.version!r}")
    version = int(args.version)
    changed = use_version(repository, version)
    print(
        f"version set {version} is named in the repository ({len(changed)} configs changed): a running cspine "
        "serve on it switches within its --store-poll seconds, its Triton reloading the models without losing "
        "availability; otherwise it is served from the next start:"
    )
    for model in model_versions(repository):
        print(f"  {model.name} {model.version}")
    return 0


def register(subparsers: argparse._SubParsersAction, settings: Settings) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the model version sets of the repository, and choose the one Triton serves",
        description="A version set is every served model at one version: 1 is the shipped SYNTHETIC phantom "
        "models, N a site's fine-tuned ones (cspine export --version N --cohort DIR). The served set is in each "
        "model's config (version_policy); cspine serve reports it in every result.",
    )
    sub = p.add_subparsers(dest="models_command", required=True)
    listing = sub.add_parser("list", help="the version sets and their model cards")
    listing.add_argument("--repository", default="model_repository")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_models_list)
    use = sub.add_parser(
        "use",
        help="serve version set N (a running cspine serve switches within seconds, without a restart); roll back "
        "with the old N. 'all': have Triton load every set, for gateways that ask for theirs by number (Kubernetes)",
    )
    use.add_argument("version", metavar="N|all")
    use.add_argument("--repository", default="model_repository")
    use.set_defaults(func=cmd_models_use)
