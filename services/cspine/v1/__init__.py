"""The gRPC API v1, compiled from protos/cspine/v1/*.proto by `make protos` (generated modules are not
committed and never edited)."""
