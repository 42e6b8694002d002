# One image for both chashd roles; the role is the command:
#   docker run chashd twistd --nodaemon --pidfile= chash-gateway --gateway-id gateway-1
#   docker run chashd twistd --nodaemon --pidfile= chash-kvstore --node-id kvstore-a --gateway gateway-1:8000
# Options come from flags or from the environment: GATEWAY_ID, LISTEN_PORT, RAFT_PORT, PEER_GATEWAYS,
# NODE_ID, GATEWAY_ADDRESS and CHASHD_<OPTION> for every other option (twistd chash-gateway --help).
# The process writes only to /var/lib/chashd (mount the data volume there) and /tmp, so the container
# runs with a read-only root filesystem. Build it with ./build.sh.

ARG PYTHON_IMAGE=python:3.11-slim

# -- build: a virtual environment in /opt/chashd holding chashd and its dependencies -----------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/chashd

WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY twisted ./twisted
COPY chashd ./chashd
# A plain (not editable) install; pip itself is not needed at run time.
RUN /opt/chashd/bin/pip install --no-cache-dir . \
    && /opt/chashd/bin/pip uninstall --yes pip

# -- run: the same Python, the virtual environment, a fixed non-root user --------------------------
FROM ${PYTHON_IMAGE}

ARG CHASHD_UID=10001

LABEL org.opencontainers.image.title="chashd" \
      org.opencontainers.image.description="chashd gateway and kvstore (the role is the command)" \
      org.opencontainers.image.licenses="MIT"

ENV PATH=/opt/chashd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN groupadd --system --gid "${CHASHD_UID}" chashd \
    && useradd --system --no-log-init --uid "${CHASHD_UID}" --gid chashd \
        --home-dir /var/lib/chashd --shell /usr/sbin/nologin chashd \
    && install -d -o chashd -g chashd -m 0700 /var/lib/chashd

COPY --from=build /opt/chashd /opt/chashd
COPY deploy/healthcheck.py /usr/local/bin/chashd-healthcheck

# The twistd plugin cache must exist before the root filesystem turns read-only; listing the plugins
# also proves that both roles load.
RUN chmod 0755 /usr/local/bin/chashd-healthcheck \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && twistd chash-gateway --help > /dev/null \
    && twistd chash-kvstore --help > /dev/null

USER ${CHASHD_UID}:${CHASHD_UID}
WORKDIR /var/lib/chashd

# Gateway: HTTP, Raft, memcached line protocol. Kvstore: HTTP, memcached line protocol.
EXPOSE 8000 8001 11211 8080 11212

# Probes GET /health on $CHASHD_HEALTH_PORT, else on the port of $LISTEN_PORT/$CHASHD_PORT, else on
# 8000 and 8080 (the two roles' default HTTP ports).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["chashd-healthcheck"]

CMD ["twistd", "--nodaemon", "--pidfile=", "chash-gateway"]
