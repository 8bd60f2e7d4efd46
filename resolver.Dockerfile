# The validating resolver of docker-compose.yml: Debian's Unbound, root anchor bootstrapped.
FROM debian:bookworm-20241111-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends unbound=1.17.* unbound-anchor=1.17.* \
      dnsutils=1:9.18.* ca-certificates=20230311* \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/unbound && chown unbound:unbound /var/lib/unbound
EXPOSE 53/udp 53/tcp
# Healthy only when it validates: `. DNSKEY` must come back with the AD flag (dig exits 0
# on SERVFAIL too, so its exit status alone proves nothing).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD ["sh", "-c", "dig +dnssec +time=3 +tries=1 @127.0.0.1 . DNSKEY | grep -Eq '^;; flags:[^;]* ad[ ;]'"]
# unbound-anchor refreshes root.key (RFC 5011); it exits 1 when it updated the file.
CMD ["sh", "-c", "unbound-anchor -a /var/lib/unbound/root.key || true; chown unbound:unbound /var/lib/unbound/root.key; exec unbound -d -c /etc/unbound/unbound.conf"]
