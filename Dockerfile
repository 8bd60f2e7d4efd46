# dane-relay container image. Build: docker compose build; run: docker compose up -d.
FROM python:3.12.8-slim-bookworm

LABEL org.opencontainers.image.title="dane-relay" \
      org.opencontainers.image.description="Outbound SMTP relay that enforces DANE (RFC 7672)"

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

USER 10025:10025
WORKDIR /var/spool/dane-relay
VOLUME ["/var/spool/dane-relay"]
EXPOSE 2525 9125

HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
  CMD ["relay", "health", "-c", "/etc/dane-relay/relay.toml"]

ENTRYPOINT ["relay"]
CMD ["serve", "-c", "/etc/dane-relay/relay.toml"]
