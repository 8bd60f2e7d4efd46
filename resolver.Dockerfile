# The validating resolver of docker-compose.yml: Debian's Unbound, root anchor bootstrapped.
FROM debian:bookworm-20241111-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends unbound=1.17.* unbound-anchor=1.17.* \
      dnsutils=1:9.18.* ca-certificates=20230311* \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/unbound && chown unbound:unbound /var/lib/unbound
EXPOSE 53/udp 53/tcp
# unbound-anchor refreshes root.key (RFC 5011); it exits 1 when it updated the file.
CMD ["sh", "-c", "unbound-anchor -a /var/lib/unbound/root.key || true; chown unbound:unbound /var/lib/unbound/root.key; exec unbound -d -c /etc/unbound/unbound.conf"]
