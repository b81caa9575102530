"""``cspine support add|list|remove|show``: curate a server's few-shot support set over the SupportSet API."""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from cspine.client import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_SERVER,
    ClientError,
    add_data_dir_argument,
    bearer_metadata,
    client_token,
    open_channel,
    stream_call,
    upload_messages,
)
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import support_pb2 as spb
from cspine.v1 import support_pb2_grpc as spb_grpc

MODALITY_NAMES = {pb.CT: "CT", pb.MR: "MR", pb.XR: "XR"}


def add_case_paths(
    address: str,
    paths,
    header: spb.CaseHeader,
    *,
    timeout_s: float,
    token: str | None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> spb.SupportCase:
    """Add the case in ``paths`` with one AddCase call."""
    with open_channel(address) as channel:
        stub = spb_grpc.SupportSetStub(channel)
        messages = upload_messages(paths, header, chunk_bytes, message=spb.CaseUpload, lead_field="header")
        return stream_call(stub.AddCase, messages, timeout_s=timeout_s, token=token)


def _unary(address: str, method: str, request, *, timeout_s: float, token: str | None):
    with open_channel(address) as channel:
        stub = spb_grpc.SupportSetStub(channel)
        try:
            return getattr(stub, method)(request, timeout=timeout_s, metadata=bearer_metadata(token))
        except grpc.RpcError as exc:
            raise ClientError.from_rpc(exc) from None


def format_version(info: spb.PrototypeSetInfo) -> str:
    classes = ", ".join(f"{c.label} ({c.cases})" for c in info.classes)
    modalities = ",".join(MODALITY_NAMES.get(m, "?") for m in info.modalities)
    return (
        f"prototype set {info.version}: {info.cases} cases; classes {classes}; prototypes for {modalities}\n"
        f"  {info.created_at} by {info.created_by}: {info.change}"
    )


def format_case(case: spb.SupportCase) -> str:
    modalities = ",".join(MODALITY_NAMES.get(m, "?") for m in case.modalities)
    synthetic = " SYNTHETIC" if case.synthetic else ""
    note = f" — {case.note}" if case.note else ""
    return (
        f"{case.case_id:>6}  {case.label:<12} {modalities:<9} {case.created_at}  {case.curator}{synthetic}  "
        f"{case.pathology_reference}{note}"
    )


def cmd_support(args: argparse.Namespace) -> int:
    try:
        if args.support == "add":
            header = spb.CaseHeader(
                label=args.label, pathology_reference=args.pathology_ref, note=args.note, create_class=args.create_class
            )
            case = add_case_paths(
                args.server, args.paths, header, timeout_s=args.timeout, token=client_token(args, "curator")
            )
            print(f"added case {case.case_id} ({case.label})")
            print(format_version(case.prototype_set))
        elif args.support == "list":
            request = spb.ListCasesRequest(version=args.version)
            answer = _unary(args.server, "ListCases", request, timeout_s=args.timeout, token=client_token(args))
            print(format_version(answer.prototype_set))
            for case in answer.cases:
                print(format_case(case))
        elif args.support == "remove":
            request = spb.RemoveCaseRequest(case_id=args.case_id)
            info = _unary(
                args.server, "RemoveCase", request, timeout_s=args.timeout, token=client_token(args, "curator")
            )
            print(f"removed case {args.case_id}")
            print(format_version(info))
        else:
            request = spb.GetPrototypeSetRequest(version=args.version)
            info = _unary(args.server, "GetPrototypeSet", request, timeout_s=args.timeout, token=client_token(args))
            print(format_version(info))
    except ClientError as exc:
        print(f"cspine: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cspine: error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_support_command(subparsers: argparse._SubParsersAction) -> None:
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
        default=os.environ.get("CSPINE_SERVER") or DEFAULT_SERVER,
        help=f"host:port (env CSPINE_SERVER; default {DEFAULT_SERVER})",
    )
    p.add_argument("--token", default=os.environ.get("CSPINE_TOKEN"), help="bearer token (env CSPINE_TOKEN)")
    add_data_dir_argument(p, "where to find the tokens `cspine serve` generated")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
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
    a = actions.add_parser("show", help="the current (or an older) prototype-set version")
    a.add_argument("--version", type=int, default=0, help="a version number (default: current)")
    p.set_defaults(func=cmd_support)
