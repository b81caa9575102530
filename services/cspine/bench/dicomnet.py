"""DICOM node benchmark: how fast studies come in over C-STORE and STOW-RS beside dcmtk to dcmtk, and how long a
study takes from its last instance leaving the PACS to its SEG and SR being stored back in it.

- Receiving: one SYNTHETIC phantom study (CT, two MR series, a radiograph) sent by ``storescu`` to ``storescp``
  (dcmtk to dcmtk, the baseline), by ``storescu`` to cspine's C-STORE SCP (instances durable in the spool
  before each response), and POSTed in one STOW-RS request to cspine; interleaved, ``repeats`` rounds, the best
  of each. Ratios are measured side by side in one run because the machine is shared. Two more runs in the same
  rounds show where the C-STORE time goes: the same pynetdicom SCP with a handler that keeps nothing (the DIMSE
  stack's own ceiling), and the spool storing the study's instances without any network (the ceiling of any
  receiver that answers each C-STORE only once the instance is durable: storescu waits for each response). A
  third puts a C++ receiver that also syncs its storage beside them: storescu → Orthanc.
- End to end: Orthanc holds the study and C-STOREs it to the node (REST ``/modalities/cspine/store``, which
  returns once the last instance is acknowledged); the clock stops when Orthanc holds the SEG and SR. Goal:
  at most the quiet period + the analysis (its audit line's seconds) + 1 s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import pydicom
import requests

from cspine.bench.peers import Orthanc, StoreScp, multipart_related, storescu
from cspine.config import DicomNodeConfig
from cspine.dicomnet.spool import Received, Spool
from cspine.phantom.generate import PhantomOptions, generate_case

BENCH_SEED = 37
QUIET_S = 2.0
TOKEN = "bench-analyst-token-0001"


def bench_dicomnet(triton_url: str | None, repeats: int = 3) -> dict[str, Any]:
    # dcmtk as Debian builds it leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment, and then
    # waits ~40 ms per C-STORE for delayed ACKs (18 instances/s here): switched off for every dcmtk process
    # (storescu, storescp, Orthanc's DICOM layer), or the baseline would flatter cspine 60-fold.
    os.environ["TCP_NODELAY"] = "1"
    with tempfile.TemporaryDirectory(prefix="cspine-bench-dicomnet-") as scratch:
        root = Path(scratch)
        generate_case(root / "study", "bench", BENCH_SEED, 0, PhantomOptions(tumor="malignant"))
        files = sorted((root / "study").rglob("*.dcm"))
        result: dict[str, Any] = {
            "instances": len(files),
            "megabytes": round(sum(f.stat().st_size for f in files) / 1e6, 1),
        }
        result["receive"] = bench_receive(files, root, repeats)
        result["end_to_end"] = _end_to_end(files, root, triton_url)
    return result


def bench_receive(files: list[Path], root: Path, repeats: int) -> dict[str, Any]:
    """Instances/s of each way in, best of ``repeats`` interleaved rounds; a path that did not keep every instance
    of the study raises RuntimeError (storescu exits 0 even when C-STOREs fail)."""
    from cspine.dicomnet.scp import StoreScp as CspineScp
    from cspine.dicomnet.stow import StowReceiver
    from cspine.gateway.tokens import TokenStore

    times: dict[str, list[float]] = {
        "dcmtk": [],
        "cspine_c_store": [],
        "cspine_stow": [],
        "pynetdicom_keeping_nothing": [],
        "spool_alone": [],
        "orthanc": [],
    }
    instances = [f.read_bytes() for f in files]
    body, content_type = multipart_related(instances)
    loop = asyncio.new_event_loop()  # the STOW-RS receiver's, on a thread of its own as in `cspine serve`
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(60)

    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    pacs = Orthanc()
    pacs.start()
    try:
        for attempt in range(repeats):
            spools = {name: Spool(root / f"{name}-{attempt}") for name in ("c_store", "stow", "alone")}
            config = DicomNodeConfig(port=0, allowed_aes=("STORESCU",))
            scp = CspineScp(spools["c_store"], config, "127.0.0.1", lambda *_: None, lambda *_: None)
            port = scp.start()
            discarding = CspineScp(_KeepsNothing(), config, "127.0.0.1", lambda *_: None, lambda *_: None)  # type: ignore[arg-type]
            discarding_port = discarding.start()
            tokens = TokenStore.from_pairs([("analyst", TOKEN)])
            stow = StowReceiver(spools["stow"], tokens, spools["stow"].limits, _nothing, _nothing)
            stow_port = on_loop(stow.start("127.0.0.1", 0))
            with StoreScp("BASELINE", root / f"storescp-{attempt}", report=False) as baseline:
                runs: dict[str, Callable[[], None]] = {
                    "dcmtk": partial(_sent, baseline.port, "BASELINE", files),
                    "cspine_c_store": partial(_sent, port, "CSPINE", files),
                    "cspine_stow": partial(_posted, stow_port, body, content_type),
                    "pynetdicom_keeping_nothing": partial(_sent, discarding_port, "CSPINE", files),
                    "spool_alone": partial(_stored, spools["alone"], instances),
                    "orthanc": partial(_sent, pacs.dicom_port, str(pacs.config["DicomAet"]), files),
                }
                order = list(runs) if attempt % 2 == 0 else list(reversed(runs))
                for name in order:
                    start = time.perf_counter()
                    runs[name]()
                    times[name].append(time.perf_counter() - start)
                kept = {name: len(spool.begin(study_uid)[2]) for name, spool in spools.items()}
                kept["storescp"] = len(list(baseline.out_dir.iterdir()))  # no reports asked: its files
                kept["orthanc"] = len(pacs.instance_ids(study_uid))
            if any(count != len(files) for count in kept.values()):
                raise RuntimeError(f"of the {len(files)} instances sent, each path kept: {kept}")
            pacs.rest("DELETE", f"/studies/{pacs.studies()[study_uid]}")  # every round stores the study anew
            scp.stop()
            discarding.stop()
            on_loop(stow.stop())
            for spool in spools.values():
                spool.close()
                shutil.rmtree(spool.root, ignore_errors=True)
    finally:
        pacs.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    best = {name: min(values) for name, values in times.items()}
    rate = {name: round(len(files) / seconds, 1) for name, seconds in best.items()}
    return {
        "instances_per_s": rate,
        "c_store_vs_dcmtk": round(rate["cspine_c_store"] / rate["dcmtk"], 2),
        "stow_vs_dcmtk": round(rate["cspine_stow"] / rate["dcmtk"], 2),
        "keeping_nothing_vs_dcmtk": round(rate["pynetdicom_keeping_nothing"] / rate["dcmtk"], 2),
        "spool_alone_vs_dcmtk": round(rate["spool_alone"] / rate["dcmtk"], 2),
        "spool_ms_per_instance": round(1000 * best["spool_alone"] / len(files), 2),
        "orthanc_vs_dcmtk": round(rate["orthanc"] / rate["dcmtk"], 2),
        "repeats": repeats,
    }


class _KeepsNothing:
    """In place of the spool for the ceiling run: identifies nothing, writes nothing, answers Success."""

    def store(self, data: bytes, peer: str, label: str) -> Received:
        return Received("", "", "", new_study=False)


def _stored(spool: Spool, instances: list[bytes]) -> None:
    for data in instances:
        spool.store(data, "127.0.0.1")


def _nothing(*_: object) -> None:
    return None


def _sent(port: int, called: str, files: list[Path]) -> None:
    run = storescu("127.0.0.1", port, called, "STORESCU", files)
    if run.returncode != 0:
        raise RuntimeError(f"storescu failed: {run.stderr[-500:]}")


def _posted(port: int, body: bytes, content_type: str) -> None:
    headers = {"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"}
    answer = requests.post(f"http://127.0.0.1:{port}/studies", data=body, headers=headers, timeout=300)
    if answer.status_code != 200:
        raise RuntimeError(f"STOW-RS answered {answer.status_code}: {answer.text[:300]}")


class _Audit(logging.Handler):
    """Keeps the DICOM node's audit fields."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            self.events.append(audit)


def _end_to_end(files: list[Path], root: Path, triton_url: str | None) -> dict[str, Any]:
    from cspine.gateway.metrics import Metrics
    from cspine.gateway.tokens import TokenStore
    from cspine.inference.client import TritonClient
    from cspine.inference.local_triton import LocalTriton, TritonPorts, default_repository

    audit = _Audit()
    logger = logging.getLogger("cspine.audit")
    logger.addHandler(audit)
    level = logger.level
    logger.setLevel(logging.INFO)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    try:
        with ExitStack() as stack:
            pacs = stack.enter_context(Orthanc())
            url = triton_url or stack.enter_context(LocalTriton(default_repository(), TritonPorts.free())).grpc_url
            for path in files:
                pacs.upload(path)

            async def run() -> dict[str, Any]:
                from cspine.dicomnet.node import DicomNode
                from cspine.service import AnalysisService

                async with TritonClient(url) as client:
                    await client.check_ready()
                    service = AnalysisService(client, default_repository())
                    config = DicomNodeConfig(
                        port=0,
                        allowed_aes=("ORTHANC",),
                        quiet_s=QUIET_S,
                        destinations=(f"pacs=dimse://ORTHANC@127.0.0.1:{pacs.dicom_port}",),
                    )
                    tokens = TokenStore.from_pairs([("analyst", TOKEN)])
                    async with DicomNode(service, config, "127.0.0.1", root / "node", Metrics(), tokens) as node:
                        assert node.dimse_port is not None
                        pacs.add_modality("cspine", "CSPINE", "127.0.0.1", node.dimse_port)
                        await asyncio.to_thread(pacs.store_to, "cspine", pacs.studies()[study_uid])
                        sent = time.perf_counter()
                        while not {"SEG", "SR"} <= set(await asyncio.to_thread(pacs.modalities, study_uid)):
                            if time.perf_counter() - sent > 600:
                                raise RuntimeError("no SEG and SR in Orthanc within 10 minutes")
                            await asyncio.sleep(0.05)
                        return {"seconds": time.perf_counter() - sent}

            measured = asyncio.run(run())
    finally:
        logger.removeHandler(audit)
        logger.setLevel(level)
    analysed = next(e for e in audit.events if e["event"] == "analysed")
    budget = QUIET_S + float(analysed["seconds"]) + 1.0
    return {
        "seconds": round(measured["seconds"], 2),
        "quiet_s": QUIET_S,
        "analysis_s": analysed["seconds"],
        "budget_s": round(budget, 2),
        "within_budget": measured["seconds"] <= budget,
    }


def format_bench(result: dict[str, Any]) -> str:
    receive, e2e = result["receive"], result["end_to_end"]
    rate = receive["instances_per_s"]
    keeping_nothing = rate["pynetdicom_keeping_nothing"]
    return "\n".join(
        [
            f"SYNTHETIC phantom study: {result['instances']} instances, {result['megabytes']} MB "
            f"(best of {receive['repeats']} interleaved rounds, loopback)",
            f"  storescu → storescp (dcmtk → dcmtk):            {rate['dcmtk']:8.1f} instances/s",
            f"  storescu → cspine C-STORE SCP:                   {rate['cspine_c_store']:8.1f} instances/s  "
            f"({receive['c_store_vs_dcmtk']:.2f}× dcmtk; goal ≥ 0.8×)",
            f"  STOW-RS POST → cspine (one request):             {rate['cspine_stow']:8.1f} instances/s  "
            f"({receive['stow_vs_dcmtk']:.2f}× dcmtk)",
            "  where the C-STORE time goes:",
            f"    the same pynetdicom SCP keeping nothing:       {keeping_nothing:8.1f} instances/s  "
            f"({receive['keeping_nothing_vs_dcmtk']:.2f}× dcmtk)",
            f"    the spool alone, no network:                   {rate['spool_alone']:8.1f} instances/s  "
            f"({receive['spool_alone_vs_dcmtk']:.2f}× dcmtk; {receive['spool_ms_per_instance']} ms per instance "
            "made durable: the ceiling of any receiver that answers after that)",
            f"    storescu → Orthanc 1.10 (C++, syncs storage):  {rate['orthanc']:8.1f} instances/s  "
            f"({receive['orthanc_vs_dcmtk']:.2f}× dcmtk)",
            f"Orthanc → cspine → SEG + SR stored in Orthanc: {e2e['seconds']:.2f} s after the last instance "
            f"(quiet period {e2e['quiet_s']:g} s + analysis {e2e['analysis_s']} s + 1 s = {e2e['budget_s']} s: "
            f"{'within' if e2e['within_budget'] else 'OVER'} the goal)",
        ]
    )
