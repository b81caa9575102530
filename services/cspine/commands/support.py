"""``cspine support add|list|remove|show``: curate a server's few-shot support set over the SupportSet API. Flags
default to ``Settings.client``."""

from __future__ import annotations

import argparse
import sys

from cspine.client import (
    ClientError,
    add_case_paths,
    format_case,
    format_version,
    format_weights,
    get_prototype_set,
    list_cases,
    remove_case,
)
from cspine.commands.client_args import add_data_dir_argument, add_tls_arguments, client_token, report_failure, tls_of
from cspine.config import DEFAULT_SERVER, Settings
from cspine.v1 import support_pb2 as spb


def cmd_support(args: argparse.Namespace) -> int:
    server, timeout_s, tls = args.server, args.timeout, tls_of(args)
    try:
        if args.support == "add":
            header = spb.CaseHeader(
                label=args.label, pathology_reference=args.pathology_ref, note=args.note, create_class=args.create_class
            )
            token = client_token(args, "curator")
            case = add_case_paths(server, args.paths, header, timeout_s=timeout_s, token=token, tls=tls)
            print(f"added case {case.case_id} ({case.label})")
            _print_version(case.prototype_set)
        elif args.support == "list":
            answer = list_cases(server, args.version, timeout_s=timeout_s, token=client_token(args), tls=tls)
            _print_version(answer.prototype_set)
            for case in answer.cases:
                print(format_case(case))
        elif args.support == "remove":
            token = client_token(args, "curator")
            info = remove_case(server, args.case_id, timeout_s=timeout_s, token=token, tls=tls)
            print(f"removed case {args.case_id}")
            _print_version(info)
        else:
            info = get_prototype_set(server, args.version, timeout_s=timeout_s, token=client_token(args), tls=tls)
            _print_version(info)
    except ClientError as exc:
        return report_failure(exc, args)
    except OSError as exc:
        print(f"cspine: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_version(info: spb.PrototypeSetInfo) -> None:
    """The version's summary, then per class its site and SYNTHETIC default cases and the site cases' weights."""
    print(format_version(info))
    table = format_weights(info)
    if table:
        print(table)


def register(subparsers: argparse._SubParsersAction, settings: Settings) -> None:
    p = subparsers.add_parser(
        "support",
        help="curate the few-shot support set of a cspine server: add, list, remove cases; show versions",
        description=(
            "Every change writes a new immutable prototype-set version that the next analysis uses (no retraining). "
            "Adding and removing need a curator token; listing and showing an analyst token. Without --token the "
            "token is read from the data directory where `cspine serve` keeps the ones it generated."
        ),
    )
    p.add_argument(
        "--server",
        default=settings.client.server,
        help=f"host:port, or grpcs://host[:port] for TLS (env CSPINE_SERVER; default {DEFAULT_SERVER})",
    )
    p.add_argument("--token", default=settings.client.token, help="bearer token (env CSPINE_TOKEN)")
    add_data_dir_argument(p, settings.client, "where to find the tokens `cspine serve` generated")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    add_tls_arguments(p, settings.client)
    actions = p.add_subparsers(dest="support", required=True)
    a = actions.add_parser("add", help="add a pathology-confirmed case (its DICOM folder)")
    a.add_argument("paths", nargs="+", metavar="PATH", help="the case's DICOM files or folders")
    a.add_argument("--label", required=True, help="its pathology class (e.g. benign, borderline, malignant)")
    a.add_argument("--pathology-ref", required=True, help="where the diagnosis is recorded (not patient identity)")
    a.add_argument("--note", default="", help="free text (no patient identity)")
    a.add_argument("--create-class", action="store_true", help="allow a label that is not yet a class")
    a = actions.add_parser("list", help="the cases of the current (or an older) version")
    a.add_argument("--version", type=int, default=0, help="a version number (default: current)")
    a = actions.add_parser("remove", help="remove a case (removing a class's last case removes the class)")
    a.add_argument("case_id", type=int)
    a = actions.add_parser(
        "show",
        help="the current (or an older) prototype-set version: per class its site and default cases, their weights",
    )
    a.add_argument("--version", type=int, default=0, help="a version number (default: current)")
    p.set_defaults(func=cmd_support)
