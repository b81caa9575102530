"""``cspine k8s status``: a cspine release on a Kubernetes cluster, read with the kubernetes client."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC

from cspine.config import Settings


def cmd_k8s_status(args: argparse.Namespace) -> int:
    from datetime import datetime

    from cspine.inference.specs import SERVED
    from cspine.ops import k8s

    # KUBECONFIG and KUBERNETES_SERVICE_HOST are the kubernetes client's own variables, read as kubectl does.
    api, namespace = k8s.connect(k8s.ClusterAccess.choose(args.kubeconfig, args.context, os.environ))
    with api:
        status = k8s.gather_status(api, args.namespace or namespace, args.release, tuple(SERVED), datetime.now(UTC))
    verdict = k8s.judge(status)
    print(json.dumps(k8s.status_json(status, verdict), indent=2) if args.json else k8s.format_status(status, verdict))
    for problem in verdict.problems:
        print(f"cspine k8s status: {problem}", file=sys.stderr)
    return 0 if verdict.healthy else 1


def register(subparsers: argparse._SubParsersAction, settings: Settings) -> None:
    p = subparsers.add_parser("k8s", help="a cspine release on a Kubernetes cluster")
    kube = p.add_subparsers(dest="k8s", required=True)
    k = kube.add_parser(
        "status",
        help="Triton and gateway pods, each model's readiness on each Triton pod, and the autoscalers of a release",
        description=(
            "Read with the kubernetes client: the release's Triton and gateway pods (labels app.kubernetes.io/name="
            "cspine, app.kubernetes.io/instance=RELEASE, app.kubernetes.io/component=triton|gateway), each served "
            "model's readiness asked of Triton through the API server's pod proxy (GET /v2/models/MODEL/ready; needs "
            "get on pods/proxy), and the HorizontalPodAutoscalers' replicas, metrics and conditions. Exit status 0 "
            "when every pod and model is ready and no HPA has AbleToScale or ScalingActive False, 1 otherwise (the "
            "problems on stderr), 2 when the cluster cannot be reached or the kubeconfig cannot be used. Tested "
            "against fixtures in the API server's and Triton's recorded answer formats, not against a live cluster."
        ),
    )
    k.add_argument("--namespace", "-n", default=None, help="the release's namespace (default: the context's)")
    k.add_argument("--release", default="cspine", help="Helm release name (default cspine)")
    k.add_argument("--context", default=None, help="kubeconfig context (default: the current context)")
    k.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig file (default: $KUBECONFIG; else, when KUBERNETES_SERVICE_HOST is set, the pod's service "
        "account; else ~/.kube/config)",
    )
    k.add_argument("--json", action="store_true", help="machine-readable output with stable keys")
    k.set_defaults(func=cmd_k8s_status)
