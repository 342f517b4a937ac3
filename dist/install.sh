#!/bin/sh
# Installs a Flotilla binary and its systemd unit, then enables and starts it.
#
#   install.sh agent [--bin FILE] [--broker mqtt(s)://HOST:PORT] [--node NAME]
#                    [--label k=v]... [--join https://CONTROLLER:7470 --token T
#                    [--ca FILE]] [--no-start]
#   install.sh controller [--bin FILE] [--mqtts-listen ADDR:PORT]
#                    [--mqtt-listen ADDR:PORT] [--api-listen ADDR:PORT] [--no-start]
#   install.sh mosquitto-config --server https://CONTROLLER:7470 --token-file FILE
#                    --out DIR --san HOST [--san HOST]... [--listen ADDR:PORT]
#                    [--ca FILE] [--key-owner USER] [--bin FILE] [--no-start]
#
# --bin defaults to the binary next to this script (cross/build puts both in
# target/cross/dist/<target>/). Settings go to /etc/flotilla/agent.env or
# controller.env: written when flags are given or the file is missing, kept
# otherwise. --join enrolls the device (`flotilla-agent join`: its
# certificate or broker password and the controller's key go to
# /var/lib/flotilla-agent/identity) before the agent starts; a device given a
# certificate needs no --broker (the join answer names the broker). The
# controller's defaults: MQTT over TLS on 0.0.0.0:8883, the plain listener on
# loopback, the API (HTTPS, tokens) on 0.0.0.0:7470 so devices can join and
# renew their certificates. mosquitto-config, on the machine of an external
# Mosquitto: flotilla and the units flotilla-mosquitto-config.{service,timer},
# which write Mosquitto's configuration into --out every hour and reload it
# when it changed; the token file (an admin API token) is copied to
# /etc/flotilla/mosquitto-config.token and --ca (the controller's CA, for its
# API certificate) to /etc/flotilla/controller-ca.pem, both owner-only like
# mosquitto-config.env. DESTDIR installs into another root (an image being
# built): nothing is run then. PREFIX (default /usr/local) is where bin/ goes.
set -eu

usage() {
  sed -n '3,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
die() {
  echo "install.sh: $*" >&2
  exit 1
}

[ $# -ge 1 ] || usage
what=$1
shift
case $what in
  agent) name=flotilla-agent unit=flotilla-agent.service env=agent.env ;;
  controller) name=flotilla unit=flotilla.service env=controller.env ;;
  # The timer runs the service; both are installed, the timer enabled.
  mosquitto-config)
    name=flotilla unit=flotilla-mosquitto-config.service env=mosquitto-config.env
    timer=flotilla-mosquitto-config.timer ;;
  *) usage ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
bin=$here/$name
broker='' node='' labels='' listen='' tls_listen='' api_listen='' join='' token='' ca=''
timer=${timer:-} server='' token_file='' out='' sans='' mq_listen='' key_owner=''
start=yes settings=no
while [ $# -gt 0 ]; do
  case $1 in
    --bin) bin=${2:?--bin needs a file}; shift ;;
    --broker) broker=${2:?--broker needs mqtt(s)://HOST:PORT}; settings=yes; shift ;;
    --node) node=${2:?--node needs a name}; settings=yes; shift ;;
    --label) labels=${labels:+$labels,}${2:?--label needs key=value}; settings=yes; shift ;;
    --mqtt-listen) listen=${2:?--mqtt-listen needs ADDR:PORT}; settings=yes; shift ;;
    --mqtts-listen) tls_listen=${2:?--mqtts-listen needs ADDR:PORT}; settings=yes; shift ;;
    --api-listen) api_listen=${2:?--api-listen needs ADDR:PORT}; settings=yes; shift ;;
    --join) join=${2:?--join needs https://CONTROLLER:7470}; shift ;;
    --token) token=${2:?--token needs the token from flotilla token create}; shift ;;
    --ca) ca=${2:?--ca needs the controller CA file}; shift ;;
    --server) server=${2:?--server needs https://CONTROLLER:7470}; settings=yes; shift ;;
    --token-file) token_file=${2:?--token-file needs a file holding an admin API token}; settings=yes; shift ;;
    --out) out=${2:?--out needs the directory Mosquitto reads}; settings=yes; shift ;;
    --san) sans=${sans:+$sans,}${2:?--san needs the name devices reach the broker by}; settings=yes; shift ;;
    --listen) mq_listen=${2:?--listen needs ADDR:PORT}; settings=yes; shift ;;
    --key-owner) key_owner=${2:?--key-owner needs a user}; settings=yes; shift ;;
    --no-start) start=no ;;
    *) usage ;;
  esac
  shift
done

[ -z "$join" ] || [ -n "$token" ] || die "--join needs --token (from \`flotilla token create\`)"
root=${DESTDIR:-}
prefix=${PREFIX:-/usr/local}
[ -f "$bin" ] || die "binary $bin: not found (expected $name built by cross/build, or --bin FILE)"
for u in $unit $timer; do
  [ -f "$here/$u" ] || die "unit $here/$u: not found next to install.sh"
done
[ "$(id -u)" = 0 ] || [ -n "$root" ] || die "run as root (the agent needs it, and so do /etc and $prefix)"
if [ -z "$root" ]; then
  # Refuses a binary for another architecture before anything is replaced.
  "$bin" --version >/dev/null 2>&1 || die "binary $bin: does not run on this machine ($(uname -m)): built for another target?"
fi

install -D -m 0755 "$bin" "$root$prefix/bin/$name"
# The unit names /usr/local/bin: point it at PREFIX.
mkdir -p "$root/etc/systemd/system"
for u in $unit $timer; do
  sed "s|/usr/local/bin/|$prefix/bin/|g" "$here/$u" >"$root/etc/systemd/system/$u"
  chmod 0644 "$root/etc/systemd/system/$u"
done

conf=$root/etc/flotilla/$env
mkdir -p "$root/etc/flotilla"
if [ "$settings" = yes ] || [ ! -f "$conf" ]; then
  [ -f "$conf" ] && cp "$conf" "$conf.old"
  if [ "$what" = agent ]; then
    [ -n "$broker" ] || [ -n "$join" ] ||
      die "$conf: missing: give --join (and --token) or --broker mqtt(s)://HOST:PORT (and --node, --label)"
    if [ -z "$node" ]; then
      # Node names are DNS labels: lowercase the host name, '-' for the rest.
      node=$(hostname | tr 'A-Z' 'a-z' | tr -c 'a-z0-9-\n' '-' | cut -c1-63)
    fi
    {
      echo "# flotilla-agent settings (README, \"flotilla-agent\"); read by $unit"
      # Without it, the broker named at join (certificate-enrolled devices).
      [ -z "$broker" ] || echo "FLOTILLA_BROKER=$broker"
      echo "FLOTILLA_NODE=$node"
      # An empty FLOTILLA_LABELS would be read as one empty label.
      [ -z "$labels" ] || echo "FLOTILLA_LABELS=$labels"
      echo "FLOTILLA_DATA_DIR=/var/lib/flotilla-agent"
    } >"$conf"
  elif [ "$what" = mosquitto-config ]; then
    [ -n "$server" ] && [ -n "$token_file" ] && [ -n "$out" ] && [ -n "$sans" ] ||
      die "$conf: missing: give --server, --token-file, --out and --san"
    [ -f "$token_file" ] || die "token file $token_file: not found"
    # Owner-only, as the token itself: created so before anything is written.
    (umask 077 && : >"$conf")
    secret=/etc/flotilla/mosquitto-config.token
    [ "$token_file" -ef "$root$secret" ] || install -m 0600 "$token_file" "$root$secret"
    if [ -n "$ca" ]; then
      [ "$ca" -ef "$root/etc/flotilla/controller-ca.pem" ] ||
        install -m 0644 "$ca" "$root/etc/flotilla/controller-ca.pem"
    fi
    {
      echo "# flotilla broker-config mosquitto settings (README, \"With your own Mosquitto\"); read by $unit"
      echo "FLOTILLA_SERVER=$server"
      echo "FLOTILLA_TOKEN_FILE=$secret"
      # Without it, the system's roots check the controller's API certificate.
      [ -z "$ca" ] || echo "FLOTILLA_CA=/etc/flotilla/controller-ca.pem"
      echo "FLOTILLA_MOSQUITTO_DIR=$out"
      echo "FLOTILLA_MOSQUITTO_SANS=$sans"
      echo "FLOTILLA_MOSQUITTO_LISTEN=${mq_listen:-0.0.0.0:8883}"
      # Mosquitto 2 reads its key after dropping root for this user.
      echo "FLOTILLA_MOSQUITTO_KEY_OWNER=${key_owner:-mosquitto}"
      # SIGHUP re-reads the ACL, revocation list, certificate and key; a new
      # CA or listener needs a restart. Neither starts a stopped Mosquitto.
      echo "FLOTILLA_MOSQUITTO_RELOAD=\"systemctl try-reload-or-restart mosquitto\""
      echo "FLOTILLA_MOSQUITTO_RESTART=\"systemctl try-restart mosquitto\""
    } >"$conf"
  else
    {
      echo "# flotilla serve settings (README, \"flotilla serve\"); read by $unit"
      echo "FLOTILLA_MQTTS_LISTEN=${tls_listen:-0.0.0.0:8883}"
      # The plain listener: loopback unless asked (password-enrolled fleets).
      [ -z "$listen" ] || echo "FLOTILLA_MQTT_LISTEN=$listen"
      echo "FLOTILLA_API_LISTEN=${api_listen:-0.0.0.0:7470}"
    } >"$conf"
  fi
  # It names a token file: owner-only, like the token.
  if [ "$what" = mosquitto-config ]; then chmod 0600 "$conf"; else chmod 0644 "$conf"; fi
fi
echo "installed $root$prefix/bin/$name, $root/etc/systemd/system/$unit${timer:+ and $timer}, $conf"

if [ "$what" = agent ] && [ -z "$root" ]; then
  # Raspberry Pi OS ships with the memory controller off: limits would not hold.
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    grep -qw memory /sys/fs/cgroup/cgroup.controllers || missing=yes
  else
    awk '$1 == "memory" && $4 == 1 { found = 1 } END { exit !found }' /proc/cgroups || missing=yes
  fi
  if [ "${missing:-}" = yes ]; then
    echo "warning: the memory cgroup controller is off: add 'cgroup_enable=memory cgroup_memory=1'" \
      "to the kernel command line (/boot/firmware/cmdline.txt on a Raspberry Pi) and reboot" >&2
  fi
fi

[ -n "$root" ] && exit 0
if [ -n "$join" ]; then
  # Enrolls with the settings the unit will use.
  (
    set -a
    . "$conf"
    "$prefix/bin/$name" join --server "$join" --token "$token" --node "$FLOTILLA_NODE" \
      --data-dir "$FLOTILLA_DATA_DIR" ${ca:+--ca "$ca"}
  ) || die "joining $join failed"
fi
[ "$start" = no ] && exit 0
if ! command -v systemctl >/dev/null 2>&1 || [ ! -d /run/systemd/system ]; then
  if [ "$what" = mosquitto-config ]; then
    # Once now; something else (cron) must run it hourly without systemd.
    (set -a && . "$conf" && "$prefix/bin/$name" broker-config mosquitto) ||
      die "$prefix/bin/$name broker-config mosquitto failed"
    echo "systemd is not running here: run '$prefix/bin/$name broker-config mosquitto' hourly (cron) with $conf" >&2
    exit 0
  fi
  echo "systemd is not running here: start $prefix/bin/$name yourself" >&2
  exit 0
fi
systemctl daemon-reload
if [ -n "$timer" ]; then
  systemctl enable --now "$timer"
  # The first run, now: its output is in the unit's journal.
  systemctl start "$unit" || die "the first run failed: journalctl -u $unit"
  systemctl --no-pager --lines=5 status "$unit" || true
  exit 0
fi
systemctl enable --now "$unit"
systemctl --no-pager --lines=5 status "$unit" || true
