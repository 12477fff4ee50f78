# onnx-compress: the service on its embedded default (API + worker, queue in SQLite under /data).
#   docker build -t onnx-compress .
#   docker run -p 127.0.0.1:8000:8000 -v onnx-compress-data:/data onnx-compress
# BASE can point at any Debian-like image with python3 and python3-venv (the official slim image by default).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md /src/
COPY onnx_ops /src/onnx_ops
COPY service /src/service
# A regular (non-editable) install: the final image needs only the venv, not the sources.
RUN /opt/venv/bin/pip install "/src[service]" \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} + \
 && rm -rf /opt/venv/lib/python3*/site-packages/pip /opt/venv/bin/pip*

FROM ${BASE}
RUN useradd --system --uid 10001 --home-dir /data --no-create-home app \
 && mkdir -p /data && chown app /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    COMPRESS_DATA_DIR=/data \
    COMPRESS_HOST=0.0.0.0 \
    COMPRESS_PORT=8000 \
    COMPRESS_CONTAINER=1
# Inside a container the server must listen on 0.0.0.0 to be reachable through a published port, so the
# loopback-only rule moves to `docker run -p 127.0.0.1:8000:8000`. Without a token the server then answers
# only loopback Host names (127.0.0.1, localhost, ::1: the default COMPRESS_ALLOWED_HOSTS), so a web page
# that rebinds its own name to 127.0.0.1 is refused, and it refuses to start if other names are allowed.
# Set COMPRESS_TOKEN (or COMPRESS_TOKEN_FILE) before publishing the port anywhere else.
USER app
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["onnx-compress", "serve"]
