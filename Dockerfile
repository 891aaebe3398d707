# syntax=docker/dockerfile:1
# Sidekey broker image: slim Python, a fixed non-root uid, installed from a built wheel, and
# fit for a read-only root file system (it writes only to a mounted /tmp and the audit path).
# Debian 13 (trixie) for its OpenSSL 3.5: inbound mTLS handshakes cost ~25 % less CPU than on
# Debian 12's 3.0 (make bench-openssl: 847 -> 1,156 handshakes per broker core-second).
# tests/test_image.py builds and installs the wheel exactly as the two stages below do.

# -- build: the project's wheel and the wheels of everything it needs, uvloop included ------
FROM python:3.11-slim-trixie AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY adapters ./adapters
# DL3013: this builds the project itself; its dependencies are bounded in pyproject.toml.
# hadolint ignore=DL3013
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[fast]'

# -- run: the wheels installed offline, no source tree, no build tools ----------------------
FROM python:3.11-slim-trixie
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/nonexistent \
    TMPDIR=/tmp
# The wheels are bind-mounted for this one step, so no layer keeps them. pip compiles the
# bytecode here: at run time the root file system may be read-only.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels 'sidekey[fast]' \
    && groupadd --system --gid 10001 sidekey \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent \
       --shell /usr/sbin/nologin sidekey \
    && sidekey --version

USER 10001:10001
WORKDIR /
# The config (and the files it names) is mounted here.
VOLUME ["/etc/sidekey"]

# The build's own health: the installed broker starts (whatever the config). The serving
# health is the admin server's /healthz and /readyz, which Kubernetes probes (the Helm chart).
HEALTHCHECK --interval=60s --timeout=10s --retries=3 CMD ["sidekey", "--version"]

ENTRYPOINT ["sidekey", "run"]
CMD ["--config", "/etc/sidekey/sidekey.yaml"]
