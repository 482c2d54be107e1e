#!/usr/bin/env bash
# A two-node test cluster on one machine: network namespaces joined by a private bridge, an OpenSSH server in each.
#
#   tests/cluster/cluster.sh up              build it (tears down any leftover first); exit 77 = cannot run here
#   tests/cluster/cluster.sh ctl CMD...      run CMD on the controller (the head node that launches jobs)
#   tests/cluster/cluster.sh on NODE CMD...  run CMD inside NODE's network namespace (node0, node1, ctl)
#   tests/cluster/cluster.sh cut NODE        bring NODE's veth down (the link is cut, the processes live on)
#   tests/cluster/cluster.sh heal NODE       bring it up again
#   tests/cluster/cluster.sh hide NODE DIR   restart NODE's sshd so that jobs started there see DIR empty
#   tests/cluster/cluster.sh unhide NODE     restart NODE's sshd without that
#   tests/cluster/cluster.sh status          what exists now
#   tests/cluster/cluster.sh down            kill everything in the namespaces, remove them; idempotent, never fails
#
# Layout (addresses from HVD_CLUSTER_NET, default 10.213.77; nothing touches the machine's own interfaces or
# /etc/hosts, and no namespace has a route anywhere but the private /24 and its loopback):
#
#   root namespace:  bridge hvdc-br (no address, no netfilter) <- veths hvdc-ctl, hvdc-node0, hvdc-node1
#   netns hvdc-ctl:    hvdeth0 NET.1   host name of the controller: ctl
#   netns hvdc-node0:  hvdeth0 NET.10  sshd, UTS host name node0
#   netns hvdc-node1:  hvdeth0 NET.11  sshd, UTS host name node1
#
# Every namespace sees the same file system. `ip netns exec` bind-mounts /etc/netns/<ns>/{hosts,ssh} over
# /etc/hosts and /etc/ssh for the processes it starts (and their children: sshd sessions, ranks), so inside the
# cluster ctl/node0/node1 resolve to the private addresses and `ssh node1` uses the test's own key, known_hosts
# (real host-key checking against keys generated here) and keep-alives. The state (keys, sshd configs and logs)
# is in HVD_CLUSTER_STATE (default /tmp/hvd-pcdarts-cluster).
set -euo pipefail

NET=${HVD_CLUSTER_NET:-10.213.77}
STATE=${HVD_CLUSTER_STATE:-/tmp/hvd-pcdarts-cluster}
PREFIX=hvdc
BRIDGE=$PREFIX-br
IFACE=hvdeth0
NODES=(node0 node1)
ALL=(ctl node0 node1)
SSHD=${SSHD:-/usr/sbin/sshd}
MARK=hvd-pcdarts-test-cluster

addr_of() { case $1 in ctl) echo "$NET.1" ;; node0) echo "$NET.10" ;; node1) echo "$NET.11" ;;
  *) echo "cluster.sh: unknown host '$1' (ctl, node0, node1)" >&2; exit 2 ;; esac; }
ns_of() { addr_of "$1" >/dev/null; echo "$PREFIX-$1"; }
log() { echo "[cluster] $*" >&2; }
skip() { echo "SKIP: $*" >&2; exit 77; }

# --- teardown: best effort, idempotent ------------------------------------------------------------------------
down() (  # a subshell: `set +e` stays in here
  set +e
  for h in "${ALL[@]}"; do
    local ns=$PREFIX-$h
    if ip netns list 2>/dev/null | grep -qw "^$ns"; then
      # everything still running in the namespace was started by this cluster: sshd, its sessions, the ranks
      for _ in 1 2 3; do
        pids=$(ip netns pids "$ns" 2>/dev/null)
        [ -z "$pids" ] && break
        kill -9 $pids 2>/dev/null
        sleep 0.2
      done
      ip netns del "$ns" 2>/dev/null
    fi
    ip link del "$PREFIX-$h" 2>/dev/null
    if grep -qs "$MARK" "/etc/netns/$ns/hosts"; then rm -rf "/etc/netns/$ns"; fi
  done
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$PREFIX-probe"); do ip netns del "$ns"; done
  ip link del "$BRIDGE" 2>/dev/null
  rmdir /etc/netns 2>/dev/null
  if [ -f "$STATE/$MARK" ]; then rm -rf "$STATE"; fi
  return 0
)

# --- bring-up -----------------------------------------------------------------------------------------------
preflight() {
  [ "$(id -u)" = 0 ] || skip "needs root (network namespaces, veth, sshd)"
  for exe in ip ssh ssh-keygen unshare hostname; do
    command -v $exe >/dev/null 2>&1 || skip "'$exe' not installed (apt-get install iproute2 openssh-client util-linux)"
  done
  [ -x "$SSHD" ] || skip "no OpenSSH server at $SSHD (apt-get install openssh-server)"
  local probe=$PREFIX-probe$$ err
  if ! err=$(ip netns add "$probe" 2>&1); then skip "this machine does not allow network namespaces: $err"; fi
  if ! err=$(ip link add "$PREFIX-p$$" type veth peer name "$PREFIX-q$$" 2>&1); then
    ip netns del "$probe" 2>/dev/null; skip "this machine does not allow veth interfaces: $err"
  fi
  ip link del "$PREFIX-p$$" 2>/dev/null || true
  if ! err=$(ip netns exec "$probe" unshare --uts --mount true 2>&1); then
    ip netns del "$probe" 2>/dev/null; skip "cannot create UTS/mount namespaces: $err"
  fi
  ip netns del "$probe"
}

write_node_conf() {  # the files ip netns exec mounts over /etc in namespace $1
  local h=$1 ns=/etc/netns/$PREFIX-$1
  mkdir -p "$ns/ssh"
  {
    echo "# $MARK: made by tests/cluster/cluster.sh up, removed by down"
    echo "127.0.0.1 localhost"
    for x in "${ALL[@]}"; do echo "$(addr_of "$x") $x"; done
  } > "$ns/hosts"
  cat > "$ns/ssh/ssh_config" <<EOF
# hvd-pcdarts test cluster: ssh client configuration inside the namespaces only
Host ctl node0 node1 $NET.*
    User root
    IdentityFile $STATE/ssh/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile $STATE/ssh/known_hosts
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 10
    # a node whose link is cut ends its ssh session (and horovodrun/mpirun's view of it) after 5 x 6 s
    ServerAliveInterval 5
    ServerAliveCountMax 6
    LogLevel ERROR
EOF
  : "$h"
}

write_sshd_conf() {
  local h=$1 dir=$STATE/$1
  mkdir -p "$dir"
  ssh-keygen -q -t ed25519 -N "" -C "hvdc-$h-host" -f "$dir/ssh_host_ed25519_key"
  echo "$h,$(addr_of "$h") $(cut -d' ' -f1,2 "$dir/ssh_host_ed25519_key.pub")" >> "$STATE/ssh/known_hosts"
  cat > "$dir/sshd_config" <<EOF
# hvd-pcdarts test cluster: sshd of $h
ListenAddress $(addr_of "$h"):22
HostKey $dir/ssh_host_ed25519_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $STATE/ssh/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
PrintLastLog no
ClientAliveInterval 5
ClientAliveCountMax 6
MaxStartups 64:30:128
MaxSessions 64
LogLevel ERROR
EOF
}

start_sshd() {  # start_sshd NODE [DIR_TO_HIDE]
  local h=$1 hide=${2:-} dir=$STATE/$1 ns
  ns=$(ns_of "$1")
  mkdir -p /run/sshd
  rm -f "$dir/sshd.pid"
  # own UTS namespace (host name = node name, as the doctor and Horovod report it) and own mount namespace
  # (a folder can be hidden under an empty tmpfs for this node only)
  ip netns exec "$ns" unshare --uts --mount --propagation private sh -c '
    set -e
    hostname "$1"
    if [ -n "$2" ]; then mount -t tmpfs -o size=1m,mode=0755 hvdc-hidden "$2"; fi
    exec "$3" -f "$4" -E "$5"' sh "$h" "$hide" "$SSHD" "$dir/sshd_config" "$dir/sshd.log"
  for _ in $(seq 1 100); do
    [ -s "$dir/sshd.pid" ] && return 0
    sleep 0.1
  done
  echo "cluster.sh: sshd on $h did not start; its log:" >&2
  cat "$dir/sshd.log" >&2 2>/dev/null || true
  return 1
}

stop_sshd() {
  local dir=$STATE/$1 pid
  pid=$(cat "$dir/sshd.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$dir/sshd.pid"
}

wait_ssh() {  # from the controller, until `ssh NODE hostname` answers NODE
  local h=$1 got=""
  for _ in $(seq 1 50); do
    got=$(ip netns exec "$PREFIX-ctl" ssh "$h" hostname 2>/dev/null || true)
    [ "$got" = "$h" ] && return 0
    sleep 0.2
  done
  echo "cluster.sh: ssh from ctl to $h does not work (got '$got'):" >&2
  ip netns exec "$PREFIX-ctl" ssh -v "$h" hostname >&2 || true
  return 1
}

up() {
  preflight
  down
  trap 'echo "cluster.sh: bring-up failed; tearing down" >&2; down' ERR
  mkdir -p "$STATE/ssh"
  touch "$STATE/$MARK"
  chmod 700 "$STATE" "$STATE/ssh"
  ssh-keygen -q -t ed25519 -N "" -C hvdc-client -f "$STATE/ssh/id_ed25519"
  cp "$STATE/ssh/id_ed25519.pub" "$STATE/ssh/authorized_keys"
  : > "$STATE/ssh/known_hosts"

  ip link add "$BRIDGE" type bridge
  # bridged frames must not go through the host's iptables (a FORWARD DROP policy would cut the cluster)
  ip link set "$BRIDGE" type bridge nf_call_iptables 0 nf_call_ip6tables 0 nf_call_arptables 0 2>/dev/null || true
  ip link set "$BRIDGE" up
  for h in "${ALL[@]}"; do
    local ns=$PREFIX-$h
    ip netns add "$ns"
    ip link add "$PREFIX-$h" type veth peer name "$IFACE" netns "$ns"
    ip link set "$PREFIX-$h" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    # IPv4 only: a fresh veth's IPv6 link-local address stays "tentative" for a moment, and a Gloo device bound
    # to the interface right after bring-up could pick it
    ip netns exec "$ns" sh -c 'for f in all default; do echo 1 > /proc/sys/net/ipv6/conf/$f/disable_ipv6; done' \
      2>/dev/null || true
    ip -n "$ns" addr add "$(addr_of "$h")/24" dev "$IFACE"
    ip -n "$ns" link set "$IFACE" up
    write_node_conf "$h"
  done
  for h in "${NODES[@]}"; do
    write_sshd_conf "$h"
    start_sshd "$h"
  done
  for h in "${NODES[@]}"; do wait_ssh "$h"; done
  # node to node too (Open MPI's daemons may start each other)
  [ "$(ip netns exec "$PREFIX-node0" ssh node1 hostname)" = node1 ]
  trap - ERR
  log "up: controller ctl ($NET.1), node0 ($NET.10), node1 ($NET.11) on $IFACE; state in $STATE"
}

status() {
  ip netns list | grep "^$PREFIX-" || echo "no $PREFIX-* namespaces"
  ip -br link show master "$BRIDGE" 2>/dev/null || true
  for h in "${NODES[@]}"; do
    local pid
    pid=$(cat "$STATE/$h/sshd.pid" 2>/dev/null || true)
    echo "$h: sshd ${pid:-not running}"
  done
}

cmd=${1:-}
shift || true
case $cmd in
  up) up ;;
  down) down ;;
  status) status ;;
  ctl) exec ip netns exec "$PREFIX-ctl" unshare --uts sh -c 'hostname ctl && exec "$@"' sh "$@" ;;
  on) ns=$(ns_of "$1"); shift; exec ip netns exec "$ns" "$@" ;;
  cut) ns=$(ns_of "$1"); ip -n "$ns" link set "$IFACE" down ;;
  heal) ns=$(ns_of "$1"); ip -n "$ns" link set "$IFACE" up ;;
  hide) [ $# = 2 ] && [ -d "$2" ] || { echo "cluster.sh: usage: hide NODE EXISTING_DIR" >&2; exit 2; }
        ns_of "$1" >/dev/null; stop_sshd "$1"; start_sshd "$1" "$(cd "$2" && pwd)"; wait_ssh "$1" ;;
  unhide) ns_of "$1" >/dev/null; stop_sshd "$1"; start_sshd "$1"; wait_ssh "$1" ;;
  *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
