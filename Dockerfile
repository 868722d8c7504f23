# streamrec serving image: the stream processor and its CLI, without the training stack.
#
#   docker build -t streamrec .
#   docker run --rm streamrec --help
#
# Only the serving core is installed (`pip install .`: pyproject's base dependencies). torch
# and the `train` extra never enter this image; `streamrec train`/`export` run elsewhere and
# hand over a model bundle (see deploy/README.md).

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY stream ./stream
COPY export ./export
COPY model ./model
RUN python -m venv /opt/streamrec \
    && /opt/streamrec/bin/pip install . \
    && /opt/streamrec/bin/streamrec --help > /dev/null


FROM python:3.11-slim

# A fixed, unprivileged uid/gid; the state directory is created here and owned by it, so a
# named volume mounted on it inherits that ownership.
RUN groupadd --system --gid 10001 streamrec \
    && useradd --system --uid 10001 --gid streamrec --no-create-home \
        --home-dir /var/lib/streamrec --shell /usr/sbin/nologin streamrec \
    && mkdir -p /var/lib/streamrec /models \
    && chown streamrec:streamrec /var/lib/streamrec

COPY --from=build /opt/streamrec /opt/streamrec

# Container defaults; every STREAMREC_* variable maps to a ProcessorSettings field and can be
# overridden at run time. Metrics listen on all interfaces inside the container (the default,
# loopback, would be unreachable for Prometheus); publish the port deliberately.
ENV PATH=/opt/streamrec/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STREAMREC_BUNDLE=/models \
    STREAMREC_STATE_DIR=/var/lib/streamrec \
    STREAMREC_METRICS_ADDR=0.0.0.0:9108

# Numeric, so that runtimes (Kubernetes runAsNonRoot) can tell it is not root.
USER 10001:10001
WORKDIR /var/lib/streamrec
VOLUME ["/var/lib/streamrec"]
EXPOSE 9108

# slim has no curl: python's urllib. urlopen raises on any non-2xx answer, so exit status 1.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/livez', timeout=4)"]

ENTRYPOINT ["streamrec"]
CMD ["run"]
