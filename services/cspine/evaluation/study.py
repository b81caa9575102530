"""``cspine evaluate study``: the clinical validation of cspine on a labelled cohort, through the same API
a hospital's systems use. The first N cases per class go into the support set (``SupportSet.AddCase``),
the rest are analysed (``AnalyzeStudy``) with every modality and with each alone, and the predictions are
compared with the pathology reference; the support set grows in steps so the learning curve shows what
each added case buys. The server's store makes the prototypes from the cases by the same rule as in service
(``PrototypeSet.from_cases``, docs/support.md): n site cases of a class weigh min(n, K)/K against the
SYNTHETIC default's class mean (K = ``SITE_CASES_TO_REPLACE``), then, once every class has
``SITE_CASES_TO_FIT`` site cases, the prototypes are fitted to them.

A cohort is a folder with one folder per case: the case's DICOM files (any layout) and ``reference.json``
(``{"class": "malignant", "subtype": "metastasis", "level": "C4"}``; class ``none`` for a tumor-free
study). ``cspine phantom`` writes this format (docs/evaluation.md).

Progress is kept in ``OUT/records.jsonl`` (one line per analysis) and ``OUT/support.json`` (cases
added), so an interrupted run resumes where it stopped and gives the same report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from cspine.client import ClientError, Tls, add_case_paths, analyze_paths
from cspine.client.enums import MODALITY_BY_NAME
from cspine.phantom.generate import REFERENCE_FILE
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import support_pb2 as spb

logger = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
SUPPORT_FILE = "support.json"
MODALITY_RUNS: dict[str, list[pb.Modality]] = {
    "all": [],
    **{name: [value] for name, value in MODALITY_BY_NAME.items()},
}
CURVE_SUBSET = 45  # studies analysed at the smaller support sizes of the learning curve


@dataclass(frozen=True)
class CohortCase:
    case_id: str
    path: Path
    truth: str  # a class label, or "none"
    subtype: str | None = None
    synthetic: bool = False


def read_cohort(folder: Path) -> list[CohortCase]:
    """The cases of a cohort folder, in name order; a case without a reference file is an error."""
    cases = []
    for case_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        reference = case_dir / REFERENCE_FILE
        if not reference.exists():
            raise ValueError(f"{case_dir.name}: no {REFERENCE_FILE} (see docs/evaluation.md for the cohort format)")
        data = json.loads(reference.read_text())
        if not isinstance(data.get("class"), str) or not data["class"]:
            raise ValueError(f"{case_dir.name}/{REFERENCE_FILE}: 'class' must be a class label or 'none'")
        cases.append(
            CohortCase(case_dir.name, case_dir, data["class"], data.get("subtype"), bool(data.get("synthetic")))
        )
    if not cases:
        raise ValueError(f"{folder} holds no case folders")
    return cases


def split_support(cases: list[CohortCase], per_class: int) -> tuple[dict[str, list[CohortCase]], list[CohortCase]]:
    """The first ``per_class`` cases of each class (tumor-free cases never) and the cases left to analyse."""
    support: dict[str, list[CohortCase]] = {}
    rest = []
    for case in cases:
        picked = support.setdefault(case.truth, []) if case.truth != "none" else None
        if picked is not None and len(picked) < per_class:
            picked.append(case)
        else:
            rest.append(case)
    return {k: v for k, v in support.items() if v}, rest


def curve_sizes(per_class: int) -> list[int]:
    """Support sizes (site cases per class) the learning curve is measured at, ending at ``per_class``."""
    return sorted({0, min(1, per_class), math.ceil(per_class / 2), per_class})


@dataclass
class Server:
    address: str
    analyst_token: str | None
    curator_token: str | None
    timeout_s: float = 300.0
    tls: Tls = Tls()  # no files: TLS only where the address asks for it


class StudyRun:
    """One evaluation run's state on disk: what was added and what was analysed."""

    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.records_path = out / RECORDS_FILE
        self.support_path = out / SUPPORT_FILE
        self.records = [json.loads(line) for line in self._lines(self.records_path)]
        self.added: dict[str, str] = json.loads(self.support_path.read_text()) if self.support_path.exists() else {}

    @staticmethod
    def _lines(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def done(self, case_id: str, modalities: str, size: int) -> bool:
        return any(
            r["case"] == case_id and r["modalities"] == modalities and r["support_per_class"] == size
            for r in self.records
        )

    def record(self, record: dict) -> None:
        with self.records_path.open("a") as f:  # one line per analysis: an interruption loses at most one
            f.write(json.dumps(record) + "\n")
        self.records.append(record)

    def mark_added(self, case_id: str, version: str) -> None:
        self.added[case_id] = version
        partial = self.support_path.with_suffix(".partial")
        partial.write_text(json.dumps(self.added, indent=1))
        partial.replace(self.support_path)


def _record(case: CohortCase, result: pb.StudyAnalysis, modalities: str, size: int) -> dict:
    fused = result.fused
    return {
        "case": case.case_id,
        "truth": case.truth,
        "subtype": case.subtype,
        "labels": [p.label for p in fused.probabilities],
        "probabilities": [round(p.probability, 6) for p in fused.probabilities],
        "detected": fused.tumor_detected,
        "detection_score": round(fused.detection_score, 6),
        "modalities": modalities,
        "support_per_class": size,
        "prototype_set_version": result.prototype_set_version,
        "models": "; ".join(f"{m.name}:{m.version}" for m in result.models),
    }


def run_study(
    cohort: list[CohortCase],
    server: Server,
    run: StudyRun,
    per_class: int,
    progress: bool = True,
    on_step: Callable[[], None] | None = None,
) -> list[dict]:
    """Add support cases step by step and analyse the rest at each step; returns every record."""
    support, rest = split_support(cohort, per_class)
    sizes = curve_sizes(per_class)
    planned = sum(len(rest) if s == per_class else min(CURVE_SUBSET, len(rest)) for s in sizes)
    planned += len(rest) * (len(MODALITY_RUNS) - 1)
    bar = tqdm(total=planned, desc="analyses", unit="study", disable=not progress)
    bar.update(len(run.records))
    try:
        for size in sizes:
            for label, cases in support.items():
                for case in cases[:size]:
                    _add(case, label, server, run)
            subset = rest if size == per_class else rest[:CURVE_SUBSET]
            runs = MODALITY_RUNS if size == per_class else {"all": []}
            for case in subset:
                for name, modalities in runs.items():
                    if run.done(case.case_id, name, size):
                        continue
                    options = pb.AnalysisOptions(modalities=modalities)
                    try:
                        result = analyze_paths(
                            server.address,
                            [case.path],
                            options,
                            timeout_s=server.timeout_s,
                            token=server.analyst_token,
                            tls=server.tls,
                        )
                    except ClientError as error:
                        if error.code != "INVALID_ARGUMENT":
                            raise
                        logger.warning("%s (%s): not analysed: %s", case.case_id, name, error)
                        result = pb.StudyAnalysis()  # counted as nothing found
                    run.record(_record(case, result, name, size))
                    bar.update()
                    if on_step is not None:
                        on_step()
    finally:
        bar.close()
    return run.records


def _add(case: CohortCase, label: str, server: Server, run: StudyRun) -> None:
    if case.case_id in run.added:
        return
    header = spb.CaseHeader(
        label=label, pathology_reference=f"cohort {case.case_id}", note="evaluation support case", create_class=True
    )
    try:
        added = add_case_paths(
            server.address, [case.path], header, timeout_s=server.timeout_s, token=server.curator_token, tls=server.tls
        )
        version = added.prototype_set.version
    except ClientError as error:
        if error.code != "INVALID_ARGUMENT":
            raise
        # already in the set (a resumed run), or refused (no lesion found): either way it is settled
        logger.warning("support case %s: %s", case.case_id, error.message)
        version = f"not added: {error.message}"
    run.mark_added(case.case_id, version)


def evaluate_cohort(
    cohort_dir: Path,
    out: Path,
    per_class: int,
    *,
    server: Server | None = None,
    n_boot: int = 1000,
    progress: bool = True,
) -> tuple[dict, dict[str, Path]]:
    """The whole run: the embedded default unless ``server``, the analyses (resuming), the report."""
    from cspine.evaluation.clinical import summarise
    from cspine.evaluation.clinical_report import write_report
    from cspine.gateway.tokens import Role, find_client_token
    from cspine.ops.embedded import EmbeddedServer

    cohort = read_cohort(cohort_dir)
    run = StudyRun(out)
    with contextlib.ExitStack() as stack:
        if server is None:
            data = out / "server-data"
            embedded = stack.enter_context(EmbeddedServer(data, out / "serve.log"))
            server = Server(
                embedded.address, find_client_token(data, Role.ANALYST), find_client_token(data, Role.CURATOR)
            )
        records = run_study(cohort, server, run, per_class, progress=progress)
    synthetic = all(case.synthetic for case in cohort)
    metrics = summarise(records, synthetic=synthetic, n_boot=n_boot)
    title = f"cspine clinical validation: {cohort_dir.name} ({len(cohort)} studies)"
    return metrics, write_report(metrics, records, out, title=title, synthetic=synthetic)
