# PostgreSQL 15 for the container lab, from Debian's postgresql-15, for hosts where the official postgres:15
# image cannot be pulled. It honours the official image's interface, so docker-compose.yml runs either one
# (POM_POSTGRES_IMAGE=postgres:15 on a host with a registry): POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB
# on first start, data in /var/lib/postgresql/data, `postgres -c name=value ...` as the command, pg_isready.
#   BASE   debian:12-slim, or pom-ha/debian:bookworm where no registry is reachable (scripts/docker-lab)
# Extra CA certificates: as deploy/docker/Dockerfile (deploy/docker/ca-certificates/*.crt).
ARG BASE=debian:12-slim
FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
COPY deploy/docker/ca-certificates/ /tmp/extra-ca/
# dpkg without fsync per file (as the official Debian images): unpacking on overlayfs is many times faster
RUN echo force-unsafe-io > /etc/dpkg/dpkg.cfg.d/docker-apt-speedup \
    && apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends ca-certificates postgresql-15 >/dev/null \
    && (cp /tmp/extra-ca/*.crt /usr/local/share/ca-certificates/ 2>/dev/null || true) \
    && update-ca-certificates >/dev/null \
    && rm -rf /var/lib/apt/lists/* /tmp/extra-ca \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
COPY deploy/docker/postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
VOLUME /var/lib/postgresql/data
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
