"""The one root of cspine's exceptions, by category; the gateway maps categories to gRPC status codes."""

from __future__ import annotations


class CspineError(Exception):
    """Root of every error cspine raises on purpose. Messages are safe to show a client: no PHI, no traces."""


class InvalidInputError(CspineError):
    """The caller sent something cspine cannot use (→ INVALID_ARGUMENT)."""


class LimitExceededError(CspineError):
    """The request is larger than a configured limit, or the service is full (→ RESOURCE_EXHAUSTED)."""


class ServiceFullError(LimitExceededError):
    """Every analysis slot and queue place is taken: the same request may pass shortly (→ RESOURCE_EXHAUSTED)."""


class UnavailableError(CspineError):
    """A dependency (Triton, the support store) does not answer (→ UNAVAILABLE)."""


class DicomInputError(InvalidInputError):
    """One uploaded DICOM instance is unusable. The message names the instance and the reason."""

    def __init__(self, instance: str, reason: str) -> None:
        self.instance = instance
        self.reason = reason
        super().__init__(f"instance {instance}: {reason}")


class NotDicomError(DicomInputError):
    """The bytes are not a DICOM Part-10 file."""


class TruncatedDicomError(DicomInputError):
    """The file ends before its data set (or its pixel data) does."""


class MissingPixelDataError(DicomInputError):
    """An image object carries no pixel data."""


class MixedStudiesError(DicomInputError):
    """One upload holds instances of more than one study."""


class InconsistentSeriesError(DicomInputError):
    """An instance disagrees with the rest of its series (rows/columns, orientation, …)."""


class UndecodablePixelDataError(DicomInputError):
    """The pixel data cannot be decoded (unsupported or corrupt encoding)."""


class FrameTooLargeError(DicomInputError, LimitExceededError):
    """A frame's decoded size would exceed the configured limit (checked before decoding)."""


class StudyTooLargeError(LimitExceededError):
    """The study has more instances, bytes or voxels than the configured limits allow."""


class MalformedDicomError(DicomInputError):
    """A required attribute (a UID, Rows, Columns, BitsAllocated …) is missing or has an unusable value."""


class EmptyStudyError(InvalidInputError):
    """The upload holds no instance of a study: nothing at all, or only DICOMDIR files."""


class DeadlineExceededError(CspineError):
    """The caller's deadline passed before the work was done (→ DEADLINE_EXCEEDED)."""


class TritonUnavailableError(UnavailableError):
    """Triton does not answer, or a model it should serve is not ready. The message names which."""


class AnalysisFailedError(CspineError):
    """Every modality of a study failed inside cspine (a model error, a bug): a server fault, never the
    caller's (→ INTERNAL). The details are in the log under the request id."""


class OutputUnavailableError(CspineError):
    """A DICOM SEG or SR cannot be made of an analysis and its source headers. The message says which object
    and why, naming no patient; the pipeline leaves the object out with an ``output_unavailable`` notice."""


class InferenceError(CspineError):
    """Triton answered a well-formed request with an error or with outputs that break the model's contract."""


class DuplicateCaseError(InvalidInputError):
    """The study is already a case of the current support set (the message names the case, never the UID)."""


class UnknownClassError(InvalidInputError):
    """The label is not a class of the current support set and the caller did not ask to create it."""


class CaseNotFoundError(InvalidInputError):
    """No case of the current support set has that id."""


class StoreUnavailableError(UnavailableError):
    """The support store's database does not answer. The message names the store, never its password."""


class StoreFullError(LimitExceededError):
    """The support store's disk is full: nothing more can be written until space is freed; what it holds is
    intact and still read (→ RESOURCE_EXHAUSTED). The message names the store, never its password."""


class UnauthenticatedError(CspineError):
    """The call carries no bearer token, or one cspine does not know (→ UNAUTHENTICATED)."""


class PermissionDeniedError(CspineError):
    """The caller's role may not do this (→ PERMISSION_DENIED). The message names the role and the action."""
