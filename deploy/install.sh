#!/usr/bin/env bash
# Installs pom-ha on ONE VM (one POM server of the inventory), as root, with systemd as init:
#
#   deploy/install.sh --inventory FILE --server pom2 [--checkout DIR] [--pg-password-file FILE] [--start]
#
#   - checks the checkout (default: the one holding this script, normally /opt/pom-ha) has its .venv and .jvm
#     (scripts/install builds them) and the inventory names this server;
#   - creates the system user `pomha` (home /var/lib/pom-ha, no shell) and the folders: /etc/pom-ha (config,
#     root:pomha 0750), /var/lib/pom-ha (state of every server and daemon), /var/log/pom-ha (JVM server logs;
#     the daemons log to the journal);
#   - writes /etc/pom-ha/cluster.toml (the inventory, 0640 root:pomha) and /etc/pom-ha/env (this server, the
#     PostgreSQL password when given, the infra arguments; 0600 root);
#   - installs the units (pom-ha.target, pom-ha-migrate, pom-ha-infra, pom-ha@<daemon> for every daemon this
#     server runs) with the checkout's path, enables them, and with --start starts pom-ha.target.
#
# Needs no network: everything comes from the checkout. A second run rewrites config and units and changes
# nothing else. Exit codes: 0 ok, 1 error (message on stderr), 2 usage.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CHECKOUT=$(dirname "$HERE")
INVENTORY="" SERVER="" PW_FILE="" START=0
ETC=/etc/pom-ha STATE=/var/lib/pom-ha LOGS=/var/log/pom-ha UNITS=${POM_UNIT_DIR:-/etc/systemd/system}
say() { printf '[deploy] %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,3\}//' >&2; exit 2; }

while (($#)); do
  case "$1" in
    --inventory) INVENTORY=${2:-}; shift 2 || usage ;;
    --server) SERVER=${2:-}; shift 2 || usage ;;
    --checkout) CHECKOUT=${2:-}; shift 2 || usage ;;
    --pg-password-file) PW_FILE=${2:-}; shift 2 || usage ;;
    --start) START=1; shift ;;
    -h|--help) usage ;;
    *) printf 'error: unknown argument %s\n' "$1" >&2; usage ;;
  esac
done
[[ -n $INVENTORY && -n $SERVER ]] || usage
[[ -f $INVENTORY ]] || die "inventory $INVENTORY: no such file"
[[ $(id -u) == 0 ]] || die "run as root (it creates a user and installs systemd units)"
CHECKOUT=$(cd "$CHECKOUT" 2>/dev/null && pwd) || die "checkout folder not found"
PY=$CHECKOUT/.venv/bin/python
[[ -x $PY ]] || die "$CHECKOUT/.venv is missing: run $CHECKOUT/scripts/install first"
[[ -d $CHECKOUT/.jvm ]] || die "$CHECKOUT/.jvm is missing: run $CHECKOUT/scripts/install first"
command -v systemctl >/dev/null || die "systemctl not found: this script installs systemd units"
if [[ -n $PW_FILE ]]; then
  [[ -r $PW_FILE ]] || die "--pg-password-file $PW_FILE: not readable"
fi

# ---- what this server runs, from the inventory (validated by the same model every daemon loads) -------------
plan=$(cd "$CHECKOUT" && "$PY" - "$INVENTORY" "$SERVER" <<'PYEOF'
import shlex
import sys
from pom_ha.config import ConfigError, load_topology
from pom_ha.infra.prometheus import METRICS_DAEMONS, server_daemons
from pom_ha.lab.platform import PLATFORM_DAEMONS
try:
    topo = load_topology(sys.argv[1])
    server = topo.server(sys.argv[2])
except ConfigError as exc:
    sys.exit(f"error: {exc}")
daemons = [d for d in PLATFORM_DAEMONS if d not in METRICS_DAEMONS or d in server_daemons(topo, server.name)]
print("DAEMONS=" + shlex.quote(" ".join(daemons)))
print("INFRA_ARGS=" + shlex.quote("--without ignite" if "ignite" in server.runs else ""))
print("RUNS=" + shlex.quote(",".join(server.runs)))
PYEOF
) || die "inventory $INVENTORY refused (see above)"
eval "$plan"
say "server $SERVER: servers [${RUNS:-none}], daemons: $DAEMONS"

# ---- user and folders ------------------------------------------------------------------------------------------
if ! id pomha >/dev/null 2>&1; then
  useradd --system --user-group --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin pomha
  say "user pomha created"
fi
install -d -o root -g pomha -m 0750 "$ETC"
install -d -o pomha -g pomha -m 0750 "$STATE" "$LOGS"
# the JVM servers log under <lab dir>/logs: that is /var/log/pom-ha
if [[ ! -L $STATE/logs ]]; then
  [[ -d $STATE/logs ]] && { cp -a "$STATE/logs/." "$LOGS/" && rm -rf "$STATE/logs"; }
  ln -s "$LOGS" "$STATE/logs"
  chown -h pomha:pomha "$STATE/logs"
fi
# the daemons read the checkout, never write it
runuser -u pomha -- test -r "$CHECKOUT/pom_ha/__init__.py" -a -x "$PY" \
  || die "user pomha cannot read $CHECKOUT (make it world-readable: chmod -R a+rX $CHECKOUT)"

# ---- configuration ------------------------------------------------------------------------------------------------
install -o root -g pomha -m 0640 "$INVENTORY" "$ETC/cluster.toml"
umask 077
{
  echo "# written by deploy/install.sh; read by the pom-ha units"
  echo "POM_SERVER=$SERVER"
  echo "POM_TOPOLOGY=$ETC/cluster.toml"
  echo "POM_LAB_DIR=$STATE"
  echo "POM_JVM_DIR=$CHECKOUT/.jvm"
  echo "POM_INFRA_ARGS=\"$INFRA_ARGS\""
  if [[ -n $PW_FILE ]]; then echo "POM_PG_PASSWORD=$(head -n1 "$PW_FILE")"; fi
} >"$ETC/env.new"
chmod 0600 "$ETC/env.new"
mv "$ETC/env.new" "$ETC/env"
umask 022
say "config: $ETC/cluster.toml, $ETC/env"

# ---- units --------------------------------------------------------------------------------------------------------
for f in pom-ha.target pom-ha-migrate.service pom-ha-infra.service pom-ha@.service; do
  sed "s#/opt/pom-ha#$CHECKOUT#g" "$HERE/systemd/$f" >"$UNITS/$f"
  chmod 0644 "$UNITS/$f"
done
install -d -m 0755 "$UNITS/pom-ha@cache-service.service.d"
sed "s#/opt/pom-ha#$CHECKOUT#g" "$HERE/systemd/pom-ha@cache-service.service.d/ignite-node.conf" \
  >"$UNITS/pom-ha@cache-service.service.d/ignite-node.conf"
systemctl daemon-reload
units=(pom-ha.target pom-ha-migrate.service pom-ha-infra.service)
for d in $DAEMONS; do units+=("pom-ha@$d.service"); done
systemctl enable --quiet "${units[@]}"
say "units enabled: ${units[*]}"
if ((START)); then
  systemctl start --no-block pom-ha.target "${units[@]}"
  say "started (no wait): watch with systemctl list-units 'pom-ha*'"
fi
say "done"
