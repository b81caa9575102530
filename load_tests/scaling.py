"""Triton scaling on a Kubernetes cluster: for each replica count of the plan (1 → N), set the release's Triton
Deployment to N replicas (pinning its HorizontalPodAutoscaler, if there is one, to minReplicas = maxReplicas = N
for the step and restoring it after), wait for N ready Triton pods, run the ``cspine loadtest`` sweep against the
gateway (--target), and report throughput per replica.

NOT YET RUN AGAINST A LIVE CLUSTER. The cluster calls use the official ``kubernetes`` client (AppsV1Api,
AutoscalingV2Api, CoreV1Api) and the names and labels of the Helm chart (Deployment and HPA
"RELEASE-cspine-triton", or "RELEASE-triton" when the release name contains "cspine"; pods labelled
app.kubernetes.io/name=cspine, app.kubernetes.io/instance=RELEASE, app.kubernetes.io/component=triton). The logic
that needs no cluster (the step plan, the HPA pin/restore decisions, counting ready pods, the step sequence, the
results table) is tested in tests/test_loadtest.py with a stand-in for the cluster.

The gateway only sends work to new Triton pods when it resolves them: run it with --triton-round-robin against the
headless service and --triton-reconnect SECONDS (the chart does), and give --settle at least that long.

    python load_tests/scaling.py --release cspine --namespace cspine --replicas 1,2,4 \\
        --target cspine.example.org:50051 --token-file analyst.token --sweep 1,2,4,8,16,32 --out out/scaling

Access needed: get/patch deployments, get/patch horizontalpodautoscalers, list pods in the namespace.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cspine.ops import k8s

logger = logging.getLogger("cspine.scaling")

READY_POLL_S = 5.0


# --------------------------------------------------------------------------------------------------------
# Pure logic


def replica_plan(replicas: Sequence[int] | None = None, max_replicas: int | None = None) -> list[int]:
    """The replica counts to measure, ascending, each once: ``replicas`` as given, else 1 … ``max_replicas``."""
    plan = sorted(set(replicas)) if replicas else list(range(1, (max_replicas or 0) + 1))
    if not plan or plan[0] < 1:
        raise ValueError(f"a replica plan needs counts of at least 1, got {list(replicas or []) or max_replicas}")
    return plan


def triton_name(release: str) -> str:
    """The Triton Deployment's (and its HPA's) name: RELEASE-cspine-triton, or RELEASE-triton when the release
    name contains "cspine" (the chart's cspine.fullname)."""
    return k8s.object_name(release, k8s.Component.TRITON)


def triton_selector(release: str) -> str:
    return k8s.component_selector(release, k8s.Component.TRITON)


@dataclass(frozen=True)
class HpaBounds:
    min_replicas: int | None  # None: the API's default (1)
    max_replicas: int


def pin_patch(n: int) -> dict:
    """The HPA patch holding it at exactly ``n`` replicas for a step."""
    return {"spec": {"minReplicas": n, "maxReplicas": n}}


def restore_patch(original: HpaBounds) -> dict:
    """The HPA patch giving back the bounds it had before the step."""
    return {"spec": {"minReplicas": original.min_replicas, "maxReplicas": original.max_replicas}}


def needs_pin(bounds: HpaBounds | None, n: int) -> bool:
    """Whether the HPA must be pinned for a step at ``n`` replicas: there is one, and it may choose another count."""
    return bounds is not None and (bounds.min_replicas != n or bounds.max_replicas != n)


def ready_count(pods: Sequence[Any]) -> int:
    """Pods that are Running and Ready and not being deleted (a pod of the old ReplicaSet on its way out is not)."""
    count = 0
    for pod in pods:
        if pod.metadata.deletion_timestamp is not None or pod.status.phase != "Running":
            continue
        conditions = pod.status.conditions or []
        count += any(c.type == "Ready" and c.status == "True" for c in conditions)
    return count


def scaling_rows(results: dict[int, dict]) -> list[dict]:
    """Per replica count: sustained studies/s (best sweep step under the p99 target), saturation studies/s, both per
    replica, and the scaling efficiency (per-replica sustained throughput against the smallest count's)."""
    rows = []
    base = None
    for n in sorted(results):
        sweep = results[n]
        best = (sweep.get("best") or {}).get("studies_per_s")
        saturation = (sweep.get("saturation") or {}).get("studies_per_s")
        per_replica = best / n if best is not None else None
        if base is None and per_replica:
            base = per_replica
        rows.append(
            {
                "replicas": n,
                "sustained_studies_per_s": best,
                "sustained_per_replica": round(per_replica, 4) if per_replica is not None else None,
                "saturation_studies_per_s": saturation,
                "saturation_per_replica": round(saturation / n, 4) if saturation is not None else None,
                "best_users": (sweep.get("best") or {}).get("users"),
                "efficiency": round(per_replica / base, 3) if per_replica is not None and base else None,
            }
        )
    return rows


def scaling_markdown(rows: list[dict]) -> str:
    def f(x, fmt="{:.3f}"):
        return "–" if x is None else fmt.format(x)

    lines = [
        "| Triton replicas | sustained studies/s | per replica | at users | saturation studies/s | per replica "
        "| efficiency |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['replicas']} | {f(r['sustained_studies_per_s'])} | {f(r['sustained_per_replica'])} | "
            f"{f(r['best_users'], '{}')} | {f(r['saturation_studies_per_s'])} | {f(r['saturation_per_replica'])} | "
            f"{f(r['efficiency'], '{:.2f}')} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# The steps, against anything that behaves like a cluster


class Cluster(Protocol):
    def replicas(self) -> int: ...
    def scale(self, n: int) -> None: ...
    def hpa_bounds(self) -> HpaBounds | None: ...
    def patch_hpa(self, patch: dict) -> None: ...
    def ready_pods(self) -> int: ...


def wait_ready(cluster: Cluster, n: int, timeout_s: float, sleep: Callable[[float], None] = time.sleep) -> float:
    """Seconds until exactly ``n`` Triton pods are ready; TimeoutError after ``timeout_s``."""
    waited = 0.0
    while True:
        ready = cluster.ready_pods()
        if ready == n:
            return waited
        if waited >= timeout_s:
            raise TimeoutError(f"{ready} Triton pods ready after {timeout_s:.0f} s, waiting for {n}")
        sleep(READY_POLL_S)
        waited += READY_POLL_S


def run_steps(
    cluster: Cluster,
    plan: list[int],
    run_sweep: Callable[[int], dict],
    *,
    ready_timeout_s: float = 900.0,
    settle_s: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[int, dict]:
    """For each count: pin the HPA if needed, scale, wait for the pods, let the gateway find them (``settle_s``),
    sweep; the HPA gets its bounds back after every step, the Deployment its replica count after the last when no
    HPA manages it, also when a step fails."""
    original_replicas = cluster.replicas()
    bounds = cluster.hpa_bounds()
    results: dict[int, dict] = {}
    try:
        for n in plan:
            pinned = needs_pin(bounds, n)
            if pinned:
                cluster.patch_hpa(pin_patch(n))
            try:
                cluster.scale(n)
                waited = wait_ready(cluster, n, ready_timeout_s, sleep)
                logger.info("%d Triton pods ready after %.0f s; settling %.0f s", n, waited, settle_s)
                sleep(settle_s)
                results[n] = run_sweep(n)
            finally:
                if pinned:
                    cluster.patch_hpa(restore_patch(bounds))
    finally:
        if bounds is None:
            cluster.scale(original_replicas)
    return results


# --------------------------------------------------------------------------------------------------------
# The real cluster


class KubernetesCluster:
    """The release's Triton Deployment, HPA and pods through the kubernetes client."""

    def __init__(self, api_client, namespace: str, release: str) -> None:
        from kubernetes import client

        self.apps = client.AppsV1Api(api_client)
        self.autoscaling = client.AutoscalingV2Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.name = triton_name(release)
        self.selector = triton_selector(release)

    def replicas(self) -> int:
        return self.apps.read_namespaced_deployment(self.name, self.namespace).spec.replicas or 0

    def scale(self, n: int) -> None:
        self.apps.patch_namespaced_deployment_scale(self.name, self.namespace, {"spec": {"replicas": n}})

    def hpa_bounds(self) -> HpaBounds | None:
        from kubernetes.client.exceptions import ApiException

        try:
            hpa = self.autoscaling.read_namespaced_horizontal_pod_autoscaler(self.name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return HpaBounds(hpa.spec.min_replicas, hpa.spec.max_replicas)

    def patch_hpa(self, patch: dict) -> None:
        self.autoscaling.patch_namespaced_horizontal_pod_autoscaler(self.name, self.namespace, patch)

    def ready_pods(self) -> int:
        return ready_count(self.core.list_namespaced_pod(self.namespace, label_selector=self.selector).items)


def _counts(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--release", default="cspine", help="Helm release name (default cspine)")
    p.add_argument("--namespace", "-n", default=None, help="the release's namespace (default: the context's)")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, in-cluster, ~/.kube)")
    p.add_argument("--replicas", type=_counts, default=None, help="Triton replica counts, e.g. 1,2,4")
    p.add_argument("--max-replicas", type=int, default=None, help="or 1 … N")
    p.add_argument("--target", required=True, help="the gateway's gRPC address")
    p.add_argument("--token-file", required=True, help="file holding an analyst token")
    p.add_argument("--gateway-metrics", default=None, help="the gateway's /metrics URL")
    p.add_argument("--triton-metrics", default=None, help="a Triton /metrics URL (one pod's figures only)")
    p.add_argument("--sweep", type=_counts, default=[1, 2, 4, 8, 16], help="users per step (default 1,2,4,8,16)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds per sweep step (default 120)")
    p.add_argument("--p99-target-ms", type=float, default=10_000.0)
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for the pods (default 900)")
    p.add_argument("--settle", type=float, default=60.0, help="seconds after the pods are ready (default 60)")
    p.add_argument("--pool", choices=["realistic", "small"], default="realistic")
    p.add_argument("--cache", default=".cache/cspine/loadtest")
    p.add_argument("--out", default="out/scaling")
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import os

    from cspine.loadtest.pool import ensure_pool
    from cspine.loadtest.runner import Load, Target, find_locustfile, sweep, warm_up

    plan = replica_plan(args.replicas, args.max_replicas)
    api, namespace = k8s.connect(k8s.ClusterAccess.choose(args.kubeconfig, args.context, os.environ))
    cluster = KubernetesCluster(api, args.namespace or namespace, args.release)
    target = Target(args.target, Path(args.token_file).read_text().strip(), args.gateway_metrics, args.triton_metrics)
    pool = ensure_pool(Path(args.cache), args.pool)
    locustfile = find_locustfile()
    out = Path(args.out)

    def run_sweep(n: int) -> dict:
        warm_up(target, pool)
        return sweep(
            target, Load(1, args.duration), args.sweep, pool, out / f"replicas-{n}", locustfile, args.p99_target_ms
        )

    with api:
        results = run_steps(cluster, plan, run_sweep, ready_timeout_s=args.ready_timeout, settle_s=args.settle)
    rows = scaling_rows(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps({"release": args.release, "steps": rows}, indent=2) + "\n")
    (out / "scaling.md").write_text(scaling_markdown(rows))
    print(scaling_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
