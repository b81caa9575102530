"""Real DICOM peers on 127.0.0.1 for the DICOM node's tests and ``cspine bench dicomnet``: a throwaway Orthanc (DIMSE +
REST + DICOMweb plugin) and dcmtk's echoscu, storescu and storescp. Every peer runs in its own temporary directory
on free ports and is stopped and removed on ``with`` exit (and, as a last resort, when it is garbage-collected or
the interpreter exits); the system Orthanc service is never used.

    with StoreScp("RESULTS_SCP") as scp, Orthanc(modalities={"OUT": scp.modality}) as pacs:
        storescu("127.0.0.1", pacs.dicom_port, pacs.aet, "MODALITY", [path])
        pacs.store_to("OUT", pacs.studies()[study_uid])
        scp.wait_for(1)

Needs the Debian packages ``orthanc``, ``orthanc-dicomweb`` and ``dcmtk`` (Orthanc 1.10, DICOMweb plugin 1.7,
dcmtk 3.6.7 here).

Loopback only: Orthanc's HTTP server refuses every non-loopback client (``RemoteAccessAllowed: false``), every
URL and modality here is 127.0.0.1, but neither Orthanc 1.10 nor dcmtk 3.6.7 can bind their DICOM listener to
one address: their DICOM ports listen on all interfaces for the few seconds a test runs.
"""

from __future__ import annotations

import json as jsonlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from cspine.inference.local_triton import free_ports

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
HOST = "127.0.0.1"
PACKAGES = "apt-get install orthanc orthanc-dicomweb dcmtk"


def _require(binary: str | Path) -> str:
    found = shutil.which(str(binary))
    assert found, f"{binary} is not installed ({PACKAGES})"
    return found


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _end(process: subprocess.Popen | None, grace: float) -> None:
    """SIGTERM, wait ``grace`` seconds, SIGKILL (``grace`` 0: SIGKILL at once); then reap it."""
    if process is None or process.poll() is not None:
        return
    if grace > 0:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            pass
    process.kill()
    process.wait(10)


def _cleanup(holder: dict, root: Path) -> None:
    """weakref.finalize's last resort: kill what is still running, remove the directory."""
    _end(holder.get("process"), 0)
    shutil.rmtree(root, ignore_errors=True)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


# ------------------------------------------------------------------------------------------------------------
# Orthanc


class Orthanc:
    """A throwaway Orthanc: ``with Orthanc() as pacs:`` (or ``start()`` … ``close()``).

    Configuration (the generated ``config.json`` is in :attr:`root`, the log in ``orthanc.log`` next to it):
    storage and index in ``root/storage``; HTTP and DICOM on free ports; DICOM AE title ``aet``; no
    authentication, loopback HTTP clients only; C-ECHO answered for any calling AE; C-STORE accepted from any
    calling AE; ``check_called_aet`` (default True, unlike Orthanc's own default) refuses associations whose
    called AE title is not ``aet``; ``modalities`` (name → ``[AET, host, port]``) are the peers
    ``store_to`` can send to (:meth:`add_modality` adds one while running); the DICOMweb plugin serves
    QIDO/WADO/STOW-RS under :attr:`dicomweb_url`; ``config`` entries override or extend all of this.

    ``overwrite_instances`` is Orthanc's ``OverwriteInstances``. Orthanc identifies an instance by a hash of
    (PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID), so "a re-sent SOP instance" means these
    four equal (the same SOPInstanceUID under another PatientID is stored as a second instance, in both modes).
    What Orthanc 1.10.1 does with a re-sent instance whose content differs (checked in
    tests/test_dicompeers.py):

    * ``False`` (default): the new instance is discarded and the stored one kept, unchanged, yet every protocol
      reports success: REST ``POST /instances`` answers 200 with ``"Status": "AlreadyStored"``, C-STORE
      answers status 0x0000 (Success), STOW-RS answers 200 and lists the instance in ReferencedSOPSequence
      (no FailedSOPSequence).
    * ``True``: the new instance replaces the stored one (same Orthanc ID, new content): REST answers
      ``"Status": "Success"``, C-STORE 0x0000, STOW-RS 200.
    """

    def __init__(
        self,
        aet: str = "ORTHANC",
        *,
        modalities: Mapping[str, Sequence[str | int]] | None = None,
        overwrite_instances: bool = False,
        check_called_aet: bool = True,
        verbose: bool = False,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        _require(ORTHANC)
        assert DICOMWEB_PLUGIN.exists(), f"the Orthanc DICOMweb plugin is missing ({DICOMWEB_PLUGIN}): {PACKAGES}"
        self.aet = aet
        self.root = Path(tempfile.mkdtemp(prefix="cspine-orthanc-"))
        self.http_port, self.dicom_port = free_ports(2)
        self.log_path = self.root / "orthanc.log"
        self.config_path = self.root / "config.json"
        self.verbose = verbose
        self.config: dict[str, Any] = {
            "Name": f"cspine-test-{uuid.uuid4().hex[:8]}",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "DicomCheckCalledAet": check_called_aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {name: list(peer) for name, peer in (modalities or {}).items()},
            "DicomModalitiesInDatabase": False,
            "OverwriteInstances": overwrite_instances,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "SaveJobs": False,
            "HttpTimeout": 30,
            "DicomScuTimeout": 10,
            **(config or {}),
        }
        self.process: subprocess.Popen | None = None
        self._holder: dict = {}
        self._finalizer = weakref.finalize(self, _cleanup, self._holder, self.root)
        self._session = requests.Session()

    # -- lifecycle ----------------------------------------------------------------------------------------

    def __enter__(self) -> Orthanc:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, timeout: float = 30.0) -> None:
        """Start Orthanc and wait until REST ``/system`` answers; RuntimeError (with the log's tail) if it
        exits or does not answer within ``timeout`` seconds."""
        assert self.process is None or self.process.poll() is not None, "Orthanc is running already"
        self.config_path.write_text(jsonlib.dumps(self.config, indent=2))
        args = [str(ORTHANC), *(["--verbose"] if self.verbose else []), str(self.config_path)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                args, cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._holder["process"] = self.process
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with status {self.process.returncode} while starting "
                    f"(HTTP {self.http_port}, DICOM {self.dicom_port}); end of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if self._session.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                _end(self.process, 0)
                raise RuntimeError(
                    f"Orthanc did not answer {self.url}/system within {timeout:g} s; "
                    f"end of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds (a clean stop takes Orthanc 1.10 about 3.5 s), then SIGKILL."""
        _end(self.process, grace)

    def restart(self, timeout: float = 30.0) -> None:
        """A clean stop and a start on the same storage, ports and configuration."""
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """Kill (its storage is thrown away, no clean stop needed) and remove the directory."""
        self._session.close()
        self._finalizer()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    # -- addresses ----------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def modality(self) -> list[str | int]:
        """This Orthanc as a DICOM peer, ``[AET, host, port]``."""
        return [self.aet, HOST, self.dicom_port]

    # -- REST ---------------------------------------------------------------------------------------------

    def rest(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> requests.Response:
        """One REST call (``path`` from the root, e.g. ``/studies``); raises on a 4xx/5xx answer if ``check``."""
        response = self._session.request(
            method, f"{self.url}{path}", json=json, data=data, headers=dict(headers or {}), timeout=timeout
        )
        if check and not response.ok:
            raise RuntimeError(f"Orthanc {method} {path}: HTTP {response.status_code}: {response.text[:2000]}")
        return response

    def upload(self, path_or_bytes: str | os.PathLike | bytes) -> dict:
        """``POST /instances`` of one Part-10 file; Orthanc's answer (``ID``, ``ParentStudy``, ``Status``: Success
        or AlreadyStored, …)."""
        data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
        return self.rest("POST", "/instances", data=data, headers={"Content-Type": "application/dicom"}).json()

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare (or replace) a DICOM peer while running; kept across restart()."""
        self.config["DicomModalities"][name] = [aet, host, port]
        self.rest("PUT", f"/modalities/{name}", json={"AET": aet, "Host": host, "Port": port})

    def store_to(self, modality_name: str, study_orthanc_id: str, timeout: float = 60.0) -> dict:
        """C-STORE a study (or any Orthanc resource ID) to a declared modality and wait until it is done
        (``POST /modalities/{name}/store``, synchronous); Orthanc's answer. RuntimeError if the store fails."""
        body = {"Resources": [study_orthanc_id], "Synchronous": True, "Timeout": int(timeout)}
        return self.rest("POST", f"/modalities/{modality_name}/store", json=body, timeout=timeout + 10).json()

    def modalities(self, study_instance_uid: str) -> list[str]:
        """The Modality of each series Orthanc holds in the study (cheap: series tags, no instance read)."""
        study = self.studies().get(study_instance_uid)
        if study is None:
            return []
        series = self.rest("GET", f"/studies/{study}/series").json()
        return sorted(s.get("MainDicomTags", {}).get("Modality", "") for s in series)

    def studies(self) -> dict[str, str]:
        """The stored studies: StudyInstanceUID → Orthanc study ID."""
        studies = self.rest("GET", "/studies?expand").json()
        return {s["MainDicomTags"]["StudyInstanceUID"]: s["ID"] for s in studies}

    def instance_ids(self, study_instance_uid: str) -> list[str]:
        """Orthanc IDs of the study's instances, by series, then InstanceNumber, then SOPInstanceUID."""
        query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_instance_uid}, "Expand": True}
        found = self.rest("POST", "/tools/find", json=query).json()

        def order(instance: dict) -> tuple:
            tags = instance.get("MainDicomTags", {})
            number = tags.get("InstanceNumber", "").strip()
            return (
                instance["ParentSeries"],
                int(number) if number.lstrip("-").isdigit() else 0,
                tags.get("SOPInstanceUID", ""),
            )

        return [instance["ID"] for instance in sorted(found, key=order)]

    def study_instances(self, study_instance_uid: str) -> list[bytes]:
        """The Part-10 bytes of every stored instance of a study (empty if there is no such study)."""
        return [self.rest("GET", f"/instances/{i}/file").content for i in self.instance_ids(study_instance_uid)]

    def stow(self, instances: Iterable[bytes], study_instance_uid: str | None = None) -> requests.Response:
        """A STOW-RS POST to this Orthanc's DICOMweb root (no check of the answer's status)."""
        body, content_type = multipart_related(instances)
        path = "/dicom-web/studies" + (f"/{study_instance_uid}" if study_instance_uid else "")
        headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
        return self.rest("POST", path, data=body, headers=headers, check=False)


def multipart_related(instances: Iterable[bytes], boundary: str | None = None) -> tuple[bytes, str]:
    """A STOW-RS request body of Part-10 instances and its Content-Type
    (``multipart/related; type="application/dicom"; boundary=…``)."""
    boundary = boundary or f"cspine-{uuid.uuid4().hex}"
    parts = [b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), data) for data in instances]
    body = b"".join(parts) + b"--%s--\r\n" % boundary.encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


# ------------------------------------------------------------------------------------------------------------
# dcmtk


def echoscu(
    host: str, port: int, called_aet: str, calling_aet: str = "ECHOSCU", timeout: float = 30.0
) -> subprocess.CompletedProcess:
    """One C-ECHO; returncode 0 when the association was accepted and the echo answered (output in text)."""
    args = [_require("echoscu"), "-to", "5", "-ta", "10", "-aet", calling_aet, "-aec", called_aet, host, str(port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def storescu(
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str,
    files: Iterable[str | os.PathLike],
    *,
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> subprocess.CompletedProcess:
    """C-STORE ``files`` (files or directories, scanned recursively) in one association; returncode 0 when all
    were stored (storescu stops at the first failure).

    ``-R``: propose only the presentation contexts the files need. Without it storescu proposes its fixed
    default list of 128 contexts, which has no room for Segmentation or Comprehensive 3D SR Storage, and such
    files fail with "No presentation context" whatever the SCP accepts."""
    paths = [str(f) for f in files]
    assert paths, "storescu needs at least one file"
    args = [_require("storescu"), "-v", "+sd", "+r", "-R", "-to", "5", "-ta", "10", "-aet", calling_aet]
    args += ["-aec", called_aet, *extra_args, host, str(port), *paths]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass(frozen=True)
class Received:
    """One instance a :class:`StoreScp` stored: who sent it, to which AE title, and where it was written."""

    calling_aet: str
    called_aet: str
    path: Path


class StoreScp:
    """dcmtk's storescp on a free 127.0.0.1 port: ``with StoreScp("RESULTS_SCP") as scp:``; ``scp.modality`` is
    its ``[AET, host, port]`` for Orthanc's DicomModalities or the node's configuration.

    Accepts every storage SOP class dcmtk knows (its default, which includes Segmentation, Comprehensive 3D SR,
    Enhanced SR and the image classes) with every transfer syntax it supports (``+xa``; the default is
    uncompressed only); ``promiscuous`` (``-pm``) also accepts unknown SOP classes. Files are written as
    ``<modality prefix>.<SOPInstanceUID>`` into ``out_dir`` (default ``root/received``); each is reported, after
    it is completely written, by storescp's ``--exec-on-reception`` (synchronous) into ``received.tsv``:
    :meth:`files`, :meth:`received` and :meth:`wait_for` read that, so they never see half-written files.
    One association at a time (storescp's single-process mode). ``report=False`` (benchmarks) runs storescp
    quiet and without the reception hook, which forks a shell per file: :meth:`files` then sees nothing."""

    def __init__(
        self,
        aet: str = "STORESCP",
        out_dir: str | os.PathLike | None = None,
        *,
        promiscuous: bool = False,
        extra_args: Sequence[str] = (),
        report: bool = True,
    ) -> None:
        self.binary = _require("storescp")
        self.aet = aet
        self.root = Path(tempfile.mkdtemp(prefix="cspine-storescp-"))
        self.out_dir = Path(out_dir) if out_dir is not None else self.root / "received"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = self.root / "received.tsv"
        self.log_path = self.root / "storescp.log"
        self.promiscuous = promiscuous
        self.extra_args = list(extra_args)
        self.report = report
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._holder: dict = {}
        self._finalizer = weakref.finalize(self, _cleanup, self._holder, self.root)

    def __enter__(self) -> StoreScp:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, timeout: float = 10.0, port: int | None = None) -> None:
        """Start listening (on ``port``, the previous port on a restart, or a free one) and wait until it does."""
        assert self.process is None or self.process.poll() is not None, "storescp is running already"
        self.port = port or self.port or free_ports(1)[0]
        # #a, #c: calling and called AE titles (dcmtk quotes them), #p/#f: the file written
        report = f"printf '%s\\t%s\\t%s\\n' '#a' '#c' '#p/#f' >> '{self.manifest}'"
        args = [self.binary, *(["-v"] if self.report else []), "-dhl", "+xa", "-aet", self.aet]
        args += ["-pm"] if self.promiscuous else []
        args += ["-od", str(self.out_dir.resolve()), *(["-xcr", report, "-xs"] if self.report else [])]
        args += [*self.extra_args, str(self.port)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                args, cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._holder["process"] = self.process
        deadline = time.monotonic() + timeout
        while not _listening(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                _end(self.process, 0)
                raise RuntimeError(
                    f"storescp did not listen on port {self.port} within {timeout:g} s "
                    f"(exit status {self.process.returncode}); end of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, grace: float = 5.0) -> None:
        _end(self.process, grace)

    def close(self) -> None:
        """Stop and remove its directory (and the received files with it, unless ``out_dir`` was given)."""
        self.stop()
        self._finalizer()

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    @property
    def host(self) -> str:
        return HOST

    @property
    def modality(self) -> list[str | int]:
        """``[AET, host, port]``."""
        return [self.aet, HOST, self.port]

    def received(self) -> list[Received]:
        """Every completely written instance so far, in arrival order."""
        if not self.manifest.exists():
            return []
        found = []
        for line in self.manifest.read_text().splitlines():
            calling, called, path = line.split("\t")
            found.append(Received(calling.strip('"'), called.strip('"'), Path(path)))
        return found

    def files(self) -> list[Path]:
        """The paths of every completely written instance so far, in arrival order."""
        return [r.path for r in self.received()]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Path]:
        """Wait until at least ``count`` instances arrived; their paths. TimeoutError (with storescp's log) if not."""
        deadline = time.monotonic() + timeout
        while len(files := self.files()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"storescp {self.aet} received {len(files)} of {count} instances in {timeout:g} s; "
                    f"end of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        return files
