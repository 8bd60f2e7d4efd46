# dane-relay container image, run by docker-compose.yml beside its validating resolver
# (docs/deploy.md): docker-compose up -d --build   (Compose v2: docker compose up -d --build)
FROM python:3.12.8-slim-bookworm

LABEL org.opencontainers.image.title="dane-relay" \
      org.opencontainers.image.description="Outbound SMTP relay that enforces DANE (RFC 7672)"

# RELAY_CONFIG names the config for every relay command in the container: `serve`, the
# HEALTHCHECK's `health` and whatever an operator runs with `docker compose exec`. The
# compose file points it at the mounted config/relay.docker.toml.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RELAY_CONFIG=/etc/dane-relay/relay.toml

WORKDIR /opt/dane-relay
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install --no-cache-dir . \
 && groupadd --system --gid 10025 relay \
 && useradd --system --uid 10025 --gid relay --home-dir /var/spool/dane-relay \
      --shell /usr/sbin/nologin relay \
 && mkdir -p /var/spool/dane-relay /etc/dane-relay \
 && chown relay:relay /var/spool/dane-relay

COPY config/relay.docker.toml /etc/dane-relay/relay.toml

# The queue folder belongs to uid 10025; a new named volume mounted here inherits that.
USER 10025:10025
WORKDIR /var/spool/dane-relay
VOLUME ["/var/spool/dane-relay"]
EXPOSE 2525 9125

# No -c: RELAY_CONFIG decides, as for `serve`. The check asks the relay's /healthz (see
# relay/ops/health.py), so it adds no SMTP session to the log.
HEALTHCHECK --interval=30s --timeout=15s --start-period=20s --retries=3 \
  CMD ["relay", "health"]

# SIGTERM drains: open SMTP transactions get listener.drain_timeout (30 s) to finish.
# Give `docker stop` longer than that (the compose file sets stop_grace_period: 45s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["relay"]
CMD ["serve"]
