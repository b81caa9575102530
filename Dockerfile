# syntax=docker/dockerfile:1
# The cspine image: the gateway (`cspine serve --triton-url …`, as the Helm chart runs it) and the model
# repository that Triton's pods copy before they build their TensorRT plans. No Docker on the development
# machines: this file is kept minimal and checked by reading, not by a build.

# -- build: compile the gRPC stubs (generated, never committed) and install cspine into a virtual environment.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY services ./services
RUN pip install "grpcio-tools>=1.75,<1.85" "protobuf>=6.31,<7" \
 && python -m grpc_tools.protoc -I protos --python_out=services --pyi_out=services --grpc_python_out=services \
      protos/cspine/v1/*.proto \
 && pip install .

# -- runtime: the virtual environment and the model repository, run as an unprivileged user.
FROM python:3.11-slim-bookworm
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin cspine
COPY --from=build /opt/venv /opt/venv
COPY model_repository /opt/cspine/model_repository
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CSPINE_MODEL_REPOSITORY=/opt/cspine/model_repository \
    CSPINE_DATA_DIR=/var/lib/cspine
USER 10001:10001
EXPOSE 50051 9464
ENTRYPOINT ["cspine"]
CMD ["serve", "--host", "0.0.0.0"]
