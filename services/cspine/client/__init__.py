"""The cspine gRPC client, for integrators' programs and cspine's own commands: channels (TLS or plaintext)
with a bearer token, the upload streams of AnalyzeStudy and AddCase, the calls, and their answers as what a
client shows. It needs neither pydicom nor the gateway: DICOM files are found on disk and sent as bytes."""

from cspine.client.calls import (
    add_case_paths,
    analyze_paths,
    get_prototype_set,
    list_cases,
    remove_case,
    service_info,
)
from cspine.client.channel import (
    DEFAULT_SERVER,
    MAX_RECEIVE_BYTES,
    ClientError,
    Tls,
    bearer_metadata,
    channel_credentials,
    open_channel,
    parse_address,
)
from cspine.client.decode import (
    UnknownCode,
    analysis_json,
    format_case,
    format_version,
    format_weights,
    to_domain,
    why_missing,
)
from cspine.client.files import is_part10, iter_files
from cspine.client.upload import DEFAULT_CHUNK_BYTES, case_messages, stream_call, upload_messages

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_SERVER",
    "MAX_RECEIVE_BYTES",
    "ClientError",
    "Tls",
    "UnknownCode",
    "add_case_paths",
    "analysis_json",
    "analyze_paths",
    "bearer_metadata",
    "case_messages",
    "channel_credentials",
    "format_case",
    "format_version",
    "format_weights",
    "get_prototype_set",
    "is_part10",
    "iter_files",
    "list_cases",
    "open_channel",
    "parse_address",
    "remove_case",
    "service_info",
    "stream_call",
    "to_domain",
    "upload_messages",
    "why_missing",
]
