"""``cspine bench pipeline``: one SYNTHETIC study (axial CT, sagittal T1/T2 MR, lateral radiograph) analysed
end to end on the local Triton, timed per stage, with Triton's own compute time per model (from its
statistics API) so the share of work outside model execution is a measured figure. ``cspine bench gateway``
and ``cspine bench adapt`` run on the same study: through gRPC and the gateway, and a new support case in use
vs fine-tuning.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from cspine.analysis.fusion import Calibration
from cspine.config import AnalysisConfig, TritonClientConfig
from cspine.dicom.ingest import ingest_paths
from cspine.fewshot.prototypes import default_prototypes
from cspine.inference.client import TritonClient
from cspine.inference.local_triton import LocalTriton, TritonPorts, default_repository
from cspine.inference.model_config import model_versions
from cspine.phantom.generate import PhantomOptions, generate_case
from cspine.pipeline import STAGES, AnalysisOptions, analyze

BENCH_SEED = 31


_COMPUTE = ("compute_input", "compute_infer", "compute_output")


async def _triton_seconds(client: TritonClient) -> dict[str, dict[str, float]]:
    """Cumulative seconds per model from Triton's statistics: compute (input + infer + output) and queue."""
    stats = await client.client.get_inference_statistics(as_json=True)
    out: dict[str, dict[str, float]] = {}
    for model in stats.get("model_stats", []):
        s = model.get("inference_stats", {})
        entry = out.setdefault(model["name"], {"compute": 0.0, "queue": 0.0})
        entry["compute"] += sum(int(s.get(k, {}).get("ns", 0)) for k in _COMPUTE) / 1e9
        entry["queue"] += int(s.get("queue", {}).get("ns", 0)) / 1e9
    return out


def _spent(before: dict, after: dict, kind: str) -> float:
    # the ensemble's time is its members' time: count the composing models only
    return sum(after[m][kind] - before.get(m, {}).get(kind, 0.0) for m in after if m != "lesion_classify")


async def _run(url: str, case_dir: Path, repeats: int) -> dict:
    repository = default_repository()
    prototypes, calibration = default_prototypes(), Calibration.load(repository)
    models = model_versions(repository)
    paths = [case_dir / f for f in ("ct", "mr", "xr")]
    runs = []
    async with TritonClient(url) as client:
        await client.check_ready()
        for attempt in range(repeats + 1):
            before = await _triton_seconds(client)
            start = time.perf_counter()
            study = await asyncio.to_thread(ingest_paths, paths)
            ingest_s = time.perf_counter() - start
            analysis = await analyze(study, client, prototypes, calibration, AnalysisOptions(), models)
            wall = time.perf_counter() - start
            after = await _triton_seconds(client)
            if attempt == 0:
                continue  # warm-up: first calls pay for sessions and buffers
            model_s, queue_s = _spent(before, after, "compute"), _spent(before, after, "queue")
            runs.append(
                {"wall": wall, "ingest": ingest_s, "model": model_s, "queue": queue_s, **analysis.stage_seconds}
            )
    shape = {s.role.value: s.slices for r in analysis.modalities for s in r.series}
    mean = {k: round(float(np.mean([r[k] for r in runs])), 4) for k in runs[0]}
    # Work seconds, not wall: modalities overlap, so shares of the wall clock would not add up. Model work is
    # Triton's compute (its Python backend's hand-over included); the rest is the pipeline's own CPU stages.
    # gRPC transport hides inside the client's wait, overlapped with queueing, and is not split out here
    # (cspine bench triton measures it: Triton over gRPC vs in-process ONNX Runtime).
    outside = sum(mean[k] for k in ("ingest", "select", "preprocess", "measure", "fuse", "dicom"))
    return {
        "synthetic": True,
        "study": {"slices": shape},
        "repeats": repeats,
        "seconds": mean,
        "wall_p_max": round(max(r["wall"] for r in runs), 4),
        "non_model_seconds": round(outside, 4),
        "non_model_share": round(outside / (outside + mean["model"]), 4),
    }


def _on_bench_study(triton_url: str | None, run: Callable[[str, Path], Coroutine[Any, Any, dict]]) -> dict:
    """Write the bench's SYNTHETIC study, start the local Triton unless a URL is given, and run ``run``."""
    with tempfile.TemporaryDirectory(prefix="cspine-bench-") as scratch, ExitStack() as stack:
        case_dir = Path(scratch) / "study"
        generate_case(case_dir, "bench", BENCH_SEED, 0, PhantomOptions(tumor="malignant"))
        url = triton_url or stack.enter_context(LocalTriton(default_repository(), TritonPorts.free())).grpc_url
        return asyncio.run(run(url, case_dir))


def bench_pipeline(triton_url: str | None, repeats: int) -> dict:
    return _on_bench_study(triton_url, lambda url, case_dir: _run(url, case_dir, repeats))


# ------------------------------------------------------------------------------------------------------
# Real matrix sizes: the same SYNTHETIC case at the phantom's matrices and at a real scanner's
# (512² × 300-slice CT, 512² MR, 3072 × 2614 radiograph), side by side in one run

# (name, folders, budget in seconds of pipeline.analyze at real size: DESIGN.md §10)
SIZE_STUDIES = (
    ("radiograph alone", ("xr",), 3.0),
    ("CT alone", ("ct",), 10.0),
    ("CT + MR + radiograph", ("ct", "mr", "xr"), 10.0),
)
MATRIX_SIZES = ("phantom", "real")


async def _sizes_run(url: str, case_dirs: dict[str, Path], repeats: int) -> dict:
    repository = default_repository()
    prototypes, calibration = default_prototypes(), Calibration.load(repository)
    models = model_versions(repository)
    runs: dict[tuple[str, str], list[dict]] = {(s, m): [] for s, _, _ in SIZE_STUDIES for m in MATRIX_SIZES}
    shapes: dict[tuple[str, str], dict[str, list[int]]] = {}
    async with TritonClient(url, TritonClientConfig(timeout_s=300.0)) as client:
        await client.check_ready()
        for attempt in range(repeats + 1):
            # interleaved, so the drift of this shared machine hits every row alike
            for name, folders, _ in SIZE_STUDIES:
                for matrix in MATRIX_SIZES:
                    paths = [case_dirs[matrix] / f for f in folders]
                    start = time.perf_counter()
                    study = await asyncio.to_thread(ingest_paths, paths)
                    ingest_s = time.perf_counter() - start
                    start = time.perf_counter()
                    analysis = await analyze(study, client, prototypes, calibration, AnalysisOptions(), models)
                    analysis_s = time.perf_counter() - start
                    by_uid = {s.series_instance_uid: s.volume.shape for s in study.series if s.volume is not None}
                    shapes[name, matrix] = {
                        used.role.value: list(by_uid[used.series_instance_uid])
                        for result in analysis.modalities
                        for used in result.series
                    }
                    del study, by_uid
                    if attempt == 0:
                        continue  # warm-up: first calls pay for sessions and buffers
                    runs[name, matrix].append({"ingest": ingest_s, "analysis": analysis_s, **analysis.stage_seconds})
    rows = []
    for name, _, budget in SIZE_STUDIES:
        for matrix in MATRIX_SIZES:
            found = runs[name, matrix]
            mean = {k: round(float(np.mean([r[k] for r in found])), 4) for k in found[0]}
            rows.append(
                {
                    "study": name,
                    "matrix": matrix,
                    "shapes": shapes[name, matrix],
                    "ingest_s": mean["ingest"],
                    "analysis_s": mean["analysis"],
                    "analysis_max_s": round(max(r["analysis"] for r in found), 4),
                    "stage_seconds": {k: mean[k] for k in STAGES if k in mean},
                    "budget_s": budget if matrix == "real" else None,
                }
            )
    return {"synthetic": True, "repeats": repeats, "rows": rows}


def bench_pipeline_sizes(triton_url: str | None, repeats: int) -> dict:
    """The SIZE_STUDIES of one SYNTHETIC case at the phantom's and at real matrix sizes, on the local Triton."""
    with tempfile.TemporaryDirectory(prefix="cspine-bench-") as scratch, ExitStack() as stack:
        case_dirs = {m: Path(scratch) / m for m in MATRIX_SIZES}
        for matrix, case_dir in case_dirs.items():
            generate_case(case_dir, "bench", BENCH_SEED, 0, PhantomOptions(tumor="malignant", matrix=matrix))
        url = triton_url or stack.enter_context(LocalTriton(default_repository(), TritonPorts.free())).grpc_url
        return asyncio.run(_sizes_run(url, case_dirs, repeats))


def _shape_text(shapes: dict[str, list[int]]) -> str:
    return ", ".join(f"{role} {k}×{r}×{c}" for role, (k, r, c) in shapes.items())


def format_sizes_bench(result: dict) -> str:
    lines = [
        f"one SYNTHETIC case at the phantom's and at real matrix sizes, mean of {result['repeats']} run(s) after a "
        "warm-up (analysis = pipeline.analyze on the local Triton; ingest beside it, not in it):",
        f"  {'study':<22} {'matrix':<8} {'ingest s':>8} {'analysis s (max)':>17} {'segment':>8} {'measure':>8}  "
        "budget          series",
    ]
    for row in result["rows"]:
        s = row["stage_seconds"]
        budget = ""
        if row["budget_s"] is not None:
            verdict = "met" if row["analysis_max_s"] <= row["budget_s"] else "NOT met"
            budget = f"≤ {row['budget_s']:.0f} s {verdict}"
        lines.append(
            f"  {row['study']:<22} {row['matrix']:<8} {row['ingest_s']:>8.2f} "
            f"{row['analysis_s']:>9.2f} ({row['analysis_max_s']:>5.2f}) {s.get('segment', 0.0):>8.2f} "
            f"{s.get('measure', 0.0):>8.2f}  {budget:<14}  {_shape_text(row['shapes'])}"
        )
    lines.append("  segment and measure are work seconds summed over modalities (they overlap in the wall clock)")
    return "\n".join(lines)


def format_bench(result: dict) -> str:
    s = result["seconds"]
    stages = ", ".join(f"{k} {s[k]:.3f}" for k in ("ingest", *STAGES) if k in s)
    return "\n".join(
        [
            f"one SYNTHETIC study, slices per series {result['study']['slices']}, mean of {result['repeats']} runs:",
            f"  wall {s['wall']:.2f} s end to end (ingest included; slowest {result['wall_p_max']:.2f} s; goal < 10 s)",
            f"  per stage (work seconds, modalities overlap): {stages}",
            f"  Triton model execution {s['model']:.2f} s (Triton's compute statistics); outside it "
            f"{result['non_model_seconds']:.2f} s in the pipeline's own stages (ingest, preprocess, measure, fuse)",
            f"  non-model share of the work: {100 * result['non_model_share']:.0f} % (goal ≤ 25 %)",
        ]
    )


# ------------------------------------------------------------------------------------------------------
# The gateway's cost: the same study through gRPC and the gateway vs the pipeline called in-process


async def _gateway_run(url: str, case_dir: Path, repeats: int) -> dict:
    import grpc

    from cspine.client import bearer_metadata
    from cspine.config import GatewayConfig
    from cspine.gateway.metrics import Metrics
    from cspine.gateway.server import start_gateway
    from cspine.gateway.tokens import TokenStore
    from cspine.service import AnalysisService
    from cspine.v1 import analysis_pb2 as pb
    from cspine.v1 import analysis_pb2_grpc as pb_grpc

    paths = sorted(p for f in ("ct", "mr", "xr") for p in (case_dir / f).glob("*.dcm"))
    blobs = [p.read_bytes() for p in paths]  # both sides start from bytes in memory
    async with TritonClient(url) as client:
        await client.check_ready()
        service = AnalysisService(client, default_repository(), AnalysisConfig(max_studies_in_flight=1))
        token = secrets.token_urlsafe(32)
        tokens = TokenStore.from_pairs([("analyst", token)])
        gateway = await start_gateway(service, GatewayConfig(port=0, metrics_port=None), Metrics(), tokens)
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{gateway.port}", options=[("grpc.max_receive_message_length", 256 << 20)]
        )
        stub = pb_grpc.SpineAnalysisStub(channel)

        async def in_process() -> float:
            start = time.perf_counter()
            await service.analyze([(f"#{i}", blob) for i, blob in enumerate(blobs)])
            return time.perf_counter() - start

        async def through_grpc() -> float:
            start = time.perf_counter()
            messages = iter([pb.StudyUpload(dicom_instance=blob) for blob in blobs])
            await stub.AnalyzeStudy(messages, timeout=120, metadata=bearer_metadata(token))
            return time.perf_counter() - start

        try:
            await in_process(), await through_grpc()  # warm-up
            direct, wire = [], []
            for _ in range(repeats):  # alternate, so drift on this shared machine hits both alike
                direct.append(await in_process())
                wire.append(await through_grpc())
        finally:
            await channel.close()
            await gateway.stop(1.0)
    d, w = float(np.median(direct)), float(np.median(wire))
    return {
        "synthetic": True,
        "instances": len(blobs),
        "megabytes": round(sum(map(len, blobs)) / 1e6, 1),
        "repeats": repeats,
        "in_process_s": round(d, 4),
        "gateway_s": round(w, 4),
        "overhead_ratio": round(w / d, 4),
    }


def bench_gateway(triton_url: str | None, repeats: int) -> dict:
    return _on_bench_study(triton_url, lambda url, case_dir: _gateway_run(url, case_dir, repeats))


def format_gateway_bench(result: dict) -> str:
    return (
        f"one SYNTHETIC study, {result['instances']} instances, {result['megabytes']} MB, median of "
        f"{result['repeats']} alternating runs:\n"
        f"  in-process pipeline (ingest + analysis) {result['in_process_s']:.3f} s; through gRPC and the gateway "
        f"{result['gateway_s']:.3f} s: {100 * (result['overhead_ratio'] - 1):+.1f} % (goal ≤ +10 %)"
    )


# ------------------------------------------------------------------------------------------------------
# Adaptation: a new support case in use vs fine-tuning the baseline on the same cases


ADAPT_CASES = (("malignant", 0), ("benign", 1), ("borderline", 2))  # (class, case index) of the support cases


async def _adapt_run(url: str, scratch: Path, repeats: int) -> dict:
    import grpc
    import torch

    from cspine.client import bearer_metadata
    from cspine.config import GatewayConfig
    from cspine.dicom.selection import select_series
    from cspine.domain import Modality
    from cspine.fewshot.prototypes import SHIPPED_METHOD, SITE_CASES_TO_FIT_FUSION, Adaptation, SupportSet
    from cspine.fewshot.store import SupportStore
    from cspine.gateway.metrics import Metrics
    from cspine.gateway.server import start_gateway
    from cspine.gateway.tokens import TokenStore
    from cspine.imaging.roi import lesion_roi
    from cspine.inference.specs import MODALITY_ORDER
    from cspine.modeling.data import CLASSES
    from cspine.modeling.evaluate import finetune_baseline
    from cspine.modeling.recipes import ARTIFACTS, load_baseline_artifact
    from cspine.service import AnalysisService
    from cspine.v1 import analysis_pb2 as pb
    from cspine.v1 import analysis_pb2_grpc as pb_grpc
    from cspine.v1 import support_pb2 as spb
    from cspine.v1 import support_pb2_grpc as spb_grpc

    cases = []
    for label, index in ADAPT_CASES:
        case_dir = scratch / f"support-{label}"
        generate_case(case_dir, f"adapt-{label}", BENCH_SEED + 1, index, PhantomOptions(tumor=label))
        cases.append((label, sorted(p for f in ("ct", "mr", "xr") for p in (case_dir / f).glob("*.dcm"))))
    query = sorted(p for f in ("ct", "mr", "xr") for p in (scratch / "study" / f).glob("*.dcm"))
    # as `cspine serve` makes its store: the shipped adaptation
    store = SupportStore(
        f"sqlite:///{scratch / 'support.db'}", adaptation=Adaptation.of_repository(SHIPPED_METHOD, default_repository())
    )
    store.migrate()
    store.seed_defaults(SupportSet.load())
    token = secrets.token_urlsafe(32)
    metadata = bearer_metadata(token)
    async with TritonClient(url) as client:
        await client.check_ready()
        service = AnalysisService(client, default_repository(), store=store)
        gateway = await start_gateway(
            service, GatewayConfig(port=0, metrics_port=None), Metrics(), TokenStore.from_pairs([("curator", token)])
        )
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        support, analysis = spb_grpc.SupportSetStub(channel), pb_grpc.SpineAnalysisStub(channel)
        adapt, live, rois = [], [], []
        try:
            for label, paths in cases:
                header = spb.CaseHeader(label=label, pathology_reference=f"bench {label}")
                upload = [spb.CaseUpload(header=header)] + [
                    spb.CaseUpload(dicom_instance=p.read_bytes()) for p in paths
                ]
                added = await support.AddCase(iter(upload), timeout=120, metadata=metadata)
                returned = time.perf_counter()
                result = await analysis.AnalyzeStudy(
                    iter([pb.StudyUpload(dicom_instance=p.read_bytes()) for p in query]), timeout=120, metadata=metadata
                )
                # the next analysis used the new set: time from AddCase returning to its start is all there is
                live.append(result.prototype_set_version == added.prototype_set.version)
                adapt.append(time.perf_counter() - returned - result.stage_seconds["total"])
                # the same cases' lesion ROIs, for the baseline
                study = await asyncio.to_thread(ingest_paths, paths)
                chosen = select_series(study).chosen
                found = await service.analyze([(p.name, p.read_bytes()) for p in paths])
                per_modality = []
                for m in MODALITY_ORDER:
                    r = found.modality(m)
                    volumes = {
                        role: s.volume for role, s in chosen.items() if role.modality is m and s.volume is not None
                    }
                    centre = np.array(r.lesions[0].centre_mm) if r and r.lesions else None
                    per_modality.append(lesion_roi(m, volumes, centre) if centre is not None else np.zeros((3, 64, 64)))
                rois.append(np.stack(per_modality))
            # the store's own write + the service's reload, measured in-process
            store_s = []
            for i in range(repeats):
                embedding = np.random.default_rng(i).normal(size=64).astype(np.float32)
                embeddings: dict[Modality | str, np.ndarray] = {MODALITY_ORDER[0]: embedding}
                start = time.perf_counter()
                uid = f"1.2.826.0.1.3680043.10.424242.{i}"
                number = await asyncio.to_thread(
                    store.add_case, uid, "benign", embeddings, pathology_reference="bench", curator="bench"
                )
                await service.refresh_prototypes()
                store_s.append(time.perf_counter() - start)
                assert service.version_number == number
            # the same once every class has SITE_CASES_TO_FIT_FUSION site cases: the fusion weights are refitted too
            refit_s = []
            rng = np.random.default_rng(7)
            for i in range(len(CLASSES) * SITE_CASES_TO_FIT_FUSION + repeats):
                label = CLASSES[i % len(CLASSES)]
                every: dict[Modality | str, np.ndarray] = {m: rng.normal(size=64).astype(np.float32) for m in Modality}
                start = time.perf_counter()
                uid = f"1.2.826.0.1.3680043.10.424243.{i}"
                await asyncio.to_thread(store.add_case, uid, label, every, pathology_reference="bench", curator="bench")
                await service.refresh_prototypes()
                if service.prototypes.fusion_weights:
                    refit_s.append(time.perf_counter() - start)
            assert len(refit_s) >= repeats
        finally:
            await channel.close()
            await gateway.stop(1.0)
            store.close()
    # fine-tune the conventionally trained baseline on the same support cases (all modalities), as evaluated
    baseline = load_baseline_artifact(ARTIFACTS / "baseline.pt")
    x = torch.from_numpy(np.stack(rois).astype(np.float32))  # [cases, modality, 3, 64, 64]
    with torch.no_grad():
        features = {m: baseline.encoder.features(x[:, m]) for m in range(len(MODALITY_ORDER))}
    labels = np.array([CLASSES.index(label) for label, _ in cases])
    tune_s = []
    for i in range(repeats):
        start = time.perf_counter()
        finetune_baseline(baseline, features, np.arange(len(cases)), labels, steps=40, seed=i)
        tune_s.append(time.perf_counter() - start)
    a, s, t = float(np.median(adapt)), float(np.median(store_s)), float(np.median(tune_s))
    return {
        "synthetic": True,
        "support_cases": len(cases),
        "next_analysis_used_new_set": all(live),
        "add_to_next_analysis_s": round(max(a, 0.0), 4),
        "store_write_and_reload_s": round(s, 4),
        "store_write_and_reload_refit_s": round(float(np.median(refit_s)), 4),
        "finetune_s": round(t, 4),
        "speedup": round(t / max(s, 1e-6), 1),
    }


def bench_adapt(triton_url: str | None, repeats: int) -> dict:
    return _on_bench_study(triton_url, lambda url, case_dir: _adapt_run(url, case_dir.parent, repeats))


def format_adapt_bench(result: dict) -> str:
    return (
        f"{result['support_cases']} SYNTHETIC support cases added through AddCase (median of the runs):\n"
        f"  the next AnalyzeStudy used the new prototype set: {result['next_analysis_used_new_set']}; from AddCase "
        f"returning to that analysis starting: {result['add_to_next_analysis_s']:.3f} s\n"
        f"  store write + reload of the prototype set: {result['store_write_and_reload_s'] * 1000:.1f} ms "
        f"(goal < 1 s) vs fine-tuning the baseline on the same cases: {result['finetune_s']:.2f} s: "
        f"{result['speedup']:.0f}× faster (goal ≥ 100×)\n"
        f"  with 10 or more site cases per class (fusion weights refitted too): store write + reload "
        f"{result['store_write_and_reload_refit_s'] * 1000:.1f} ms (goal ≤ 1 s)"
    )
