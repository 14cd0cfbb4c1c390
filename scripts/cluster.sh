#!/bin/bash
# A cluster of N "nodes" on this machine, for running real multi-node MPI jobs on one host: each
# node is a network namespace with its own hostname (its processes see only its network), joined
# to the others by a veth link into one bridge, each link shaped to a token-bucket rate in both
# directions. Ranks of one node share memory (Open MPI's shared-memory transport, one orted per
# node); ranks of different nodes talk TCP over the shaped links — what a multi-node job does.
#
#   scripts/cluster.sh up 2 --ranks-per-node 2 --link-gbit 1   # makes n1, n2; prints the mpirun prefix
#   $(scripts/cluster.sh prefix) -n 4 build/launch/moe_train --config ...
#   scripts/cluster.sh status                                  # what exists, the links' rates
#   scripts/cluster.sh down                                    # removes exactly what up made
#
# Needs root (ip netns, veth, bridge, tc tbf; unshare --uts). `up` on an existing cluster replaces
# it; `down` is safe to repeat and after a failed run. Everything it makes is named with the prefix
# ${MOE_CLUSTER_NAME:-moecl} (namespaces <name>-n<i>, host-side links <name>-v<i>, bridge <name>0)
# on the subnet 10.231.${MOE_CLUSTER_NET:-0}.0/24; its state (hostfile, launch agent, node list) is
# in ${MOE_CLUSTER_STATE:-/run/moe-cluster}. Nothing outside those names is touched; clusters with
# other names, nets and state folders live side by side (the tests use their own).
#
# Exit codes: 0 done; 2 bad usage or arguments; 3 this machine cannot make the cluster (not root,
# a tool or kernel feature missing: the message names it); 1 any other failure.
set -euo pipefail

STATE=${MOE_CLUSTER_STATE:-/run/moe-cluster}
NET=${MOE_CLUSTER_NET:-0}
NAME=${MOE_CLUSTER_NAME:-moecl}
SUBNET="10.231.${NET}"
BRIDGE="${NAME}0"
[[ "$NAME" =~ ^[a-z][a-z0-9]{0,7}$ ]] || { echo "cluster.sh: MOE_CLUSTER_NAME='$NAME' must be 1-8 lowercase letters or digits, a letter first" >&2; exit 2; }
[[ "$NET" =~ ^[0-9]+$ && "$NET" -le 255 ]] || { echo "cluster.sh: MOE_CLUSTER_NET='$NET' must be an integer in [0, 255]" >&2; exit 2; }

die() { echo "cluster.sh: $2" >&2; exit "$1"; }

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

need_root_tools() {
  [[ $(id -u) == 0 ]] || die 3 "needs root (network namespaces, links and qdiscs)"
  for tool in ip tc unshare mpirun; do
    command -v "$tool" > /dev/null || die 3 "'$tool' not found (Debian: iproute2, util-linux, openmpi-bin)"
  done
}

# Removes what the state says up made, then anything else of ours by name (a crashed up).
down() {
  local ns
  for ns in $(ip netns list 2> /dev/null | awk '{print $1}' | grep -E "^${NAME}-n[0-9]+\$" || true); do
    ip netns pids "$ns" 2> /dev/null | xargs -r kill -9 2> /dev/null || true
    ip netns del "$ns"
  done
  local link
  for link in $(ip -o link show 2> /dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' |
                grep -E "^${NAME}-v[0-9]+\$" || true); do
    ip link del "$link" 2> /dev/null || true
  done
  if ip link show "$BRIDGE" > /dev/null 2>&1; then ip link del "$BRIDGE"; fi
  rm -rf "$STATE"
}

# tbf's bucket must hold at least one timer tick of the rate: 2 ms of it, at least 64 KiB.
burst_bytes() {
  awk -v g="$1" 'BEGIN { b = g * 1e9 / 8 / 500; if (b < 65536) b = 65536; printf "%d", b }'
}

up() {
  local nodes="" per_node=1 gbit=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --ranks-per-node) per_node=${2:-}; shift 2 ;;
      --link-gbit) gbit=${2:-}; shift 2 ;;
      -h|--help) usage ;;
      -*) die 2 "unknown flag '$1' (see --help)" ;;
      *) [[ -z "$nodes" ]] || die 2 "one node count expected, got '$nodes' and '$1'"; nodes=$1; shift ;;
    esac
  done
  [[ "$nodes" =~ ^[0-9]+$ && "$nodes" -ge 1 && "$nodes" -le 64 ]] ||
    die 2 "up N: the node count N='$nodes' must be an integer in [1, 64]"
  [[ "$per_node" =~ ^[0-9]+$ && "$per_node" -ge 1 ]] ||
    die 2 "--ranks-per-node='$per_node' must be an integer >= 1"
  if [[ -n "$gbit" ]]; then
    awk -v g="$gbit" 'BEGIN { exit !(g + 0 > 0 && g + 0 <= 400) }' < /dev/null ||
      die 2 "--link-gbit='$gbit' must be a number in (0, 400]"
  fi
  need_root_tools
  down
  mkdir -p "$STATE"
  # From here, a failure leaves nothing half made.
  trap 'down; exit 1' ERR
  ip link add "$BRIDGE" type bridge || die 3 "cannot create a bridge (kernel bridge support)"
  ip addr add "${SUBNET}.254/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  : > "$STATE/hostfile"
  : > "$STATE/nodes"
  local i
  for ((i = 1; i <= nodes; ++i)); do
    local ns="${NAME}-n$i" veth="${NAME}-v$i" addr="${SUBNET}.$i"
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$BRIDGE"
    ip link set "$veth" up
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip addr add "$addr/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
    if [[ -n "$gbit" ]]; then
      local burst
      burst=$(burst_bytes "$gbit")
      # Out of the node (its eth0) and into it (the bridge side of its link).
      ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "${gbit}gbit" burst "$burst" latency 100ms
      tc qdisc add dev "$veth" root tbf rate "${gbit}gbit" burst "$burst" latency 100ms
    fi
    echo "$addr slots=$per_node" >> "$STATE/hostfile"
    echo "$addr $ns n$i" >> "$STATE/nodes"
  done
  # Open MPI's launcher runs `agent <host> <command>` for each node: here, the command in that
  # node's namespace under its own hostname (a UTS namespace of its own).
  cat > "$STATE/agent.sh" << EOF
#!/bin/sh
host="\$1"; shift
line=\$(grep "^\$host " "$STATE/nodes") || { echo "cluster agent: no node \$host" >&2; exit 1; }
ns=\$(echo "\$line" | cut -d' ' -f2); name=\$(echo "\$line" | cut -d' ' -f3)
exec ip netns exec "\$ns" unshare --uts /bin/sh -c "hostname \$name && \$*"
EOF
  chmod +x "$STATE/agent.sh"
  echo "mpirun --hostfile $STATE/hostfile --mca plm_rsh_agent $STATE/agent.sh" \
       "--mca btl self,vader,tcp --mca btl_tcp_if_include ${SUBNET}.0/24" \
       "--mca oob_tcp_if_include ${SUBNET}.0/24 --allow-run-as-root" > "$STATE/prefix"
  echo "${gbit:-unshaped}" > "$STATE/link_gbit"
  trap - ERR
  echo "cluster: $nodes nodes x $per_node ranks, links ${gbit:-unshaped}${gbit:+ Gbit/s}; run with:" >&2
  cat "$STATE/prefix"
}

status() {
  [[ -f "$STATE/nodes" ]] || { echo "cluster: none"; return 0; }
  echo "cluster: $(wc -l < "$STATE/nodes") nodes, links $(cat "$STATE/link_gbit") (hostfile $STATE/hostfile)"
  local addr ns name
  while read -r addr ns name; do
    echo "  $name $addr $ns"
  done < "$STATE/nodes"
  echo "prefix: $(cat "$STATE/prefix")"
}

prefix() {
  [[ -f "$STATE/prefix" ]] || die 1 "no cluster: run 'cluster.sh up N' first"
  cat "$STATE/prefix"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) need_root_tools; down ;;
  status) status ;;
  prefix) prefix ;;
  -h|--help|help|"") usage ;;
  *) die 2 "unknown command '$1' (up, down, status, prefix)" ;;
esac
