#!/bin/sh
# Installs a Flotilla binary and its systemd unit, then enables and starts it.
#
#   install.sh agent [--bin FILE] [--broker mqtt(s)://HOST:PORT] [--node NAME]
#                    [--label k=v]... [--join https://CONTROLLER:7470 --token T
#                    [--ca FILE]] [--no-start]
#   install.sh controller [--bin FILE] [--mqtts-listen ADDR:PORT]
#                    [--mqtt-listen ADDR:PORT] [--api-listen ADDR:PORT] [--no-start]
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
# renew their certificates. DESTDIR installs into another root (an image being
# built): nothing is run then. PREFIX (default /usr/local) is where bin/ goes.
set -eu

usage() {
  sed -n '3,9p' "$0" | sed 's/^# \{0,1\}//' >&2
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
  *) usage ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
bin=$here/$name
broker='' node='' labels='' listen='' tls_listen='' api_listen='' join='' token='' ca=''
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
    --no-start) start=no ;;
    *) usage ;;
  esac
  shift
done

[ -z "$join" ] || [ -n "$token" ] || die "--join needs --token (from \`flotilla token create\`)"
root=${DESTDIR:-}
prefix=${PREFIX:-/usr/local}
[ -f "$bin" ] || die "binary $bin: not found (expected $name built by cross/build, or --bin FILE)"
[ -f "$here/$unit" ] || die "unit $here/$unit: not found next to install.sh"
[ "$(id -u)" = 0 ] || [ -n "$root" ] || die "run as root (the agent needs it, and so do /etc and $prefix)"
if [ -z "$root" ]; then
  # Refuses a binary for another architecture before anything is replaced.
  "$bin" --version >/dev/null 2>&1 || die "binary $bin: does not run on this machine ($(uname -m)): built for another target?"
fi

install -D -m 0755 "$bin" "$root$prefix/bin/$name"
# The unit names /usr/local/bin: point it at PREFIX.
mkdir -p "$root/etc/systemd/system"
sed "s|/usr/local/bin/|$prefix/bin/|g" "$here/$unit" >"$root/etc/systemd/system/$unit"
chmod 0644 "$root/etc/systemd/system/$unit"

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
  else
    {
      echo "# flotilla serve settings (README, \"flotilla serve\"); read by $unit"
      echo "FLOTILLA_MQTTS_LISTEN=${tls_listen:-0.0.0.0:8883}"
      # The plain listener: loopback unless asked (password-enrolled fleets).
      [ -z "$listen" ] || echo "FLOTILLA_MQTT_LISTEN=$listen"
      echo "FLOTILLA_API_LISTEN=${api_listen:-0.0.0.0:7470}"
    } >"$conf"
  fi
  chmod 0644 "$conf"
fi
echo "installed $root$prefix/bin/$name, $root/etc/systemd/system/$unit, $conf"

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
  echo "systemd is not running here: start $prefix/bin/$name yourself" >&2
  exit 0
fi
systemctl daemon-reload
systemctl enable --now "$unit"
systemctl --no-pager --lines=5 status "$unit" || true
