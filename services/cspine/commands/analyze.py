"""``cspine analyze``, the command an integrator tries cspine with on their own DICOM folder: uploads a study to a
server and prints its analysis. Flags default to ``Settings.client``; the calls themselves are the client
package's (cspine.client)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cspine.client import ClientError, analysis_json, analyze_paths, to_domain, why_missing
from cspine.client.enums import MODALITY_BY_NAME
from cspine.commands.client_args import add_data_dir_argument, add_tls_arguments, client_token, report_failure, tls_of
from cspine.config import DEFAULT_SERVER, Settings
from cspine.v1 import analysis_pb2 as pb

DEFAULT_TIMEOUT_S = 120.0
MODALITY_OPTIONS = MODALITY_BY_NAME


def _modalities(text: str) -> list[int]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODALITY_OPTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown modality {', '.join(unknown) or '(none)'}; choose from {','.join(MODALITY_OPTIONS)}"
        )
    return [MODALITY_OPTIONS[n] for n in dict.fromkeys(names)]


def cmd_analyze(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cspine.analysis.text import format_analysis

    want_seg = bool(args.seg or args.overlay)
    options = pb.AnalysisOptions(
        return_dicom_seg=want_seg, return_dicom_sr=bool(args.sr), modalities=args.modalities or []
    )
    bar = tqdm(desc="upload", unit="B", unit_scale=True, unit_divisor=1024, disable=True if args.quiet else None)
    try:
        result = analyze_paths(
            args.server,
            args.paths,
            options,
            timeout_s=args.timeout,
            token=client_token(args, required=False),
            progress=bar.update,
            tls=tls_of(args),
        )
    except ClientError as exc:
        return report_failure(exc, args)
    except OSError as exc:
        print(f"cspine: error: {exc}", file=sys.stderr)
        return 2
    finally:
        bar.close()

    if args.json:
        print(analysis_json(result))
    else:
        print(format_analysis(to_domain(result)))
        print(f"request id {result.request_id}")
    said = sys.stderr if args.json else sys.stdout  # keep stdout pure JSON
    # The analysis is printed: from here on a failure is a one-line note on stderr, never a traceback or exit 2.
    for path, data in ((args.seg, result.dicom_seg), (args.sr, result.dicom_sr)):
        if path and data:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_bytes(data)
            except OSError as exc:
                print(f"cspine: {path} not written: {exc.strerror or type(exc).__name__}", file=sys.stderr)
            else:
                print(f"wrote {path} ({len(data) / 1e6:.2f} MB)", file=said)
    if args.sr and not result.dicom_sr:
        print(f"cspine: {why_missing(result, 'SR')}: --sr not written", file=sys.stderr)
    if want_seg and not result.dicom_seg:
        print(f"cspine: {why_missing(result, 'SEG')}: no --seg/--overlay", file=sys.stderr)
    elif args.overlay:
        from cspine.overlay import OverlayError, overlay_png

        try:
            print(f"wrote {overlay_png(result.dicom_seg, args.paths, Path(args.overlay))}", file=said)
        except OverlayError as exc:
            print(f"cspine: overlay not drawn: {exc}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 — a picture must not hide the printed analysis behind a traceback
            print(f"cspine: overlay not drawn: unexpected {type(exc).__name__}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction, settings: Settings) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="send a DICOM study to a cspine server and print its analysis",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Upload every DICOM Part-10 file under PATH… (one study: CT, MR and/or a lateral radiograph of the\n"
            "cervical spine) to a cspine server's AnalyzeStudy call and print the analysis: per modality the\n"
            "series used, lesions and class probabilities; the fused tumor assessment; canal, cord and disc per\n"
            "level, Cobb angle, OPLL; and notices (series skipped and why, modalities missing).\n"
            "\n"
            "Files that are not DICOM Part-10 (no 'DICM' at byte 128) are skipped; files over 3 MiB are sent in\n"
            "chunks. Results on cspine's SYNTHETIC phantom data are research output, not a diagnosis.\n"
            "\n"
            "exit status: 0 analysed; 2 not analysed: a PATH is missing or unreadable, or the server refused the\n"
            "study (its gRPC status code and message are printed, e.g. INVALID_ARGUMENT naming the instance and\n"
            "why) or could not be reached (UNAVAILABLE: is a server, e.g. `cspine serve`, listening on --server?\n"
            "does it serve TLS? then give --ca)."
        ),
        epilog=(
            "examples:\n"
            "  cspine analyze ~/studies/patient-0042\n"
            "  cspine analyze study/ --modalities ct,xr --seg seg.dcm --sr sr.dcm --overlay tumor.png\n"
            "  CSPINE_SERVER=cspine.example.org:50051 cspine analyze study/ --json > analysis.json\n"
            "  cspine analyze study/ --server cspine.example.org:50051 --ca ca.pem   # TLS, token in CSPINE_TOKEN"
        ),
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="DICOM files or folders of one study (searched recursively)"
    )
    p.add_argument(
        "--server",
        default=settings.client.server,
        metavar="ADDR",
        help="the cspine server, host:port, or grpcs://host[:port] for TLS with the system's CAs "
        f"(env CSPINE_SERVER; default {DEFAULT_SERVER})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the StudyAnalysis message as JSON (proto field names, zeros included) instead of the report; "
        "the SEG and SR bytes are left out (use --seg/--sr)",
    )
    p.add_argument("--seg", metavar="OUT.dcm", help="ask for the DICOM Segmentation and write it here")
    p.add_argument(
        "--sr", metavar="OUT.dcm", help="ask for the DICOM SR (TID 1500 measurement report) and write it here"
    )
    p.add_argument(
        "--overlay",
        metavar="OUT.png",
        help="ask for the DICOM Segmentation and draw it on the local source image with the most tumor (PNG)",
    )
    p.add_argument(
        "--modalities",
        type=_modalities,
        default=None,
        metavar="ct,mr,xr",
        help="analyse only these modalities (default: every modality in the study)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"deadline of the whole call, upload included (default {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--token",
        default=settings.client.token,
        help="bearer token sent as 'authorization: Bearer TOKEN' (env CSPINE_TOKEN, which keeps it out of ps); "
        "default: the analyst token `cspine serve` generated in --data-dir",
    )
    add_data_dir_argument(p, settings.client, "where to find the tokens `cspine serve` generated")
    p.add_argument("--quiet", action="store_true", help="no upload progress bar")
    add_tls_arguments(p, settings.client)
    p.set_defaults(func=cmd_analyze)
