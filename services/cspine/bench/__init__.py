"""The benchmarks of ``cspine bench``, one home above what they measure: ``ingest`` (DICOM ingest beside bare
pydicom), ``models`` (the exported ONNX models in ONNX Runtime), ``triton`` (the CPU Triton repository) and
``end_to_end`` (one SYNTHETIC study through the pipeline, the gateway and the few-shot store). Import the
submodules (``cspine.bench.triton`` …)."""
