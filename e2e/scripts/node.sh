#!/usr/bin/env bash
# Starts (or stops) a loopback cluster with one real node: the control plane of
# control-plane.sh (without kwok) plus containerd with runc, the CNI bridge, host-local,
# loopback and portmap plugins, kubelet, kube-proxy (iptables) and CoreDNS, all on this machine.
# Images come from images.sh (buildah, no registry); pods use what is imported.
#
#   node.sh start   prints KUBECONFIG=... (also written to $DIR/env)
#   node.sh stop    removes every pod's containers and mounts, stops everything; logs stay
#
# Addresses: the node and the host are 10.244.0.1 on the bridge `semantis0`; pods get
# 10.244.0.0/24, Services 10.0.0.0/24; cluster DNS (CoreDNS on the host) is 10.244.0.1:53.
# Services on the host that pods use (MinIO, Postgres) listen on 10.244.0.1.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/pids.sh
. "$HERE/../../scripts/pids.sh"
export SEMANTIS_E2E_DIR=${SEMANTIS_NODE_DIR:-/tmp/semantis-node}
DIR=$SEMANTIS_E2E_DIR
CACHE=${SEMANTIS_CACHE:-$HOME/.cache/semantis}
NODE=semantis-node
NODE_IP=10.244.0.1
BRIDGE=semantis0
SOCK=$DIR/containerd/containerd.sock
# Image content survives restarts (re-importing a 400 MB image costs a minute); containers,
# snapshots' mounts and state do not.
CTR_ROOT=$CACHE/e2e/containerd-root

log() { echo "node: $*" >&2; }

packages() {
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  command -v buildah >/dev/null || missing+=(buildah)
  [[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v conntrack >/dev/null || missing+=(conntrack)
  if ((${#missing[@]})); then
    log "installing ${missing[*]} from Debian's packages"
    apt-get install -y -qq "${missing[@]}" >&2 || { apt-get update -qq >&2 && apt-get install -y -qq "${missing[@]}" >&2; }
  fi
}

ctr_() { ctr --address "$SOCK" -n k8s.io "$@"; }

stop_node() {
  # Pods first, while containerd still answers: kill and delete every task and container.
  if [[ -S $SOCK ]] && [[ -n $(pid_ours "$DIR/pids/containerd" "$DIR") ]]; then
    local pid
    for p in kubelet kube-proxy coredns; do
      pid=$(pid_ours "$DIR/pids/$p" "$DIR")
      [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
    done
    local t
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true; done
    for t in $(ctr_ tasks ls -q 2>/dev/null); do
      for _ in $(seq 1 50); do ctr_ tasks delete "$t" >/dev/null 2>&1 && break; sleep 0.1; done
    done
    for t in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$t" >/dev/null 2>&1 || true; done
  fi
  pkill -9 -f "containerd-shim-runc-v2 .*-address $SOCK" 2>/dev/null || true
  # kube-proxy's rules go with it.
  local bin
  # `|| true`: on a fresh machine nothing is built yet, and under pipefail the failed `ls`
  # would end the script.
  bin=$(ls -d "$CACHE"/e2e/node-bin/*/ 2>/dev/null | head -1 || true)
  [[ -n $bin && -x $bin/kube-proxy ]] && "$bin/kube-proxy" --cleanup >/dev/null 2>&1 || true
  bash "$HERE/control-plane.sh" stop
  # Volume, secret and rootfs mounts of the pods, deepest first.
  if [[ -d $DIR ]]; then
    awk -v d="$DIR" '$2 ~ "^"d { print $2 }' /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  fi
  awk -v d="$CTR_ROOT" '$2 ~ "^"d { print $2 }' /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  for ns in /var/run/netns/cni-*; do [[ -e $ns ]] && ip netns delete "$(basename "$ns")" 2>/dev/null || true; done
}

certs() {
  local d=$DIR/pki
  issue() { # name subject extensions
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$d/$1.key" -out "$d/$1.csr" 2>/dev/null
    printf '%s\n' "$3" > "$d/$1.ext"
    openssl x509 -req -in "$d/$1.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
      -days 3650 -extfile "$d/$1.ext" -out "$d/$1.crt" 2>/dev/null
  }
  issue kubelet-client "/O=system:nodes/CN=system:node:$NODE" "extendedKeyUsage=clientAuth"
  issue kubelet-serving "/CN=$NODE" "subjectAltName=IP:$NODE_IP,DNS:$NODE
extendedKeyUsage=serverAuth"
  issue kube-proxy "/CN=system:kube-proxy" "extendedKeyUsage=clientAuth"
}

kubeconfig_for() { # name cert
  local server
  server=$(sed -n 's#^\s*server: ##p' "$DIR/kubeconfig")
  cat > "$DIR/$1.kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster: {server: "$server", certificate-authority: $DIR/pki/ca.crt}
users:
- name: $1
  user: {client-certificate: $DIR/pki/$2.crt, client-key: $DIR/pki/$2.key}
contexts:
- name: e2e
  context: {cluster: e2e, user: $1}
current-context: e2e
KCFG
}

network() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
  fi
  ip addr replace "$NODE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  modprobe br_netfilter 2>/dev/null || true
  sysctl -qw net.ipv4.ip_forward=1
  sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
}

wait_for() { # what command...
  local what=$1; shift
  for _ in $(seq 1 1200); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  log "$what did not come up; see $DIR/logs"
  return 1
}

start_containerd() {
  mkdir -p "$DIR/containerd" "$DIR/cni/net.d" "$CTR_ROOT"
  cat > "$DIR/cni/net.d/10-semantis.conflist" <<CNI
{
  "cniVersion": "1.0.0",
  "name": "semantis-e2e",
  "plugins": [
    {
      "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": true, "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$DIR/cni/ipam",
        "ranges": [[{ "subnet": "10.244.0.0/24", "rangeStart": "10.244.0.10", "gateway": "$NODE_IP" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
CNI
  cat > "$DIR/containerd/config.toml" <<TOML
version = 2
root = "$CTR_ROOT"
state = "$DIR/containerd/state"
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/semantis/pause:e2e"
  enable_selinux = false
  # This machine withholds CAP_SYS_RESOURCE: no process may lower its OOM score below its
  # parent's, so the sandbox's -998 (and a Guaranteed pod's -997) are clamped to ours.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$DIR/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = ""
TOML
  containerd --config "$DIR/containerd/config.toml" > "$DIR/logs/containerd.log" 2>&1 &
  pid_save "$DIR/pids/containerd" $!
  wait_for containerd ctr --address "$SOCK" version
  # Leftovers of an earlier run (the metadata lives with the image content).
  local t
  for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true; ctr_ tasks delete -f "$t" >/dev/null 2>&1 || true; done
  for t in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$t" >/dev/null 2>&1 || true; done
}

start_kubelet() {
  local bin=$1 port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("0.0.0.0",0)); print(s.getsockname()[1]); s.close()')
  mkdir -p "$DIR/kubelet"
  cat > "$DIR/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $port
readOnlyPort: 0
healthzPort: 0
containerRuntimeEndpoint: unix://$SOCK
cgroupDriver: cgroupfs
# This machine mounts cgroup v1; kubelet 1.36 refuses it unless told.
failCgroupV1: false
failSwapOn: false
tlsCertFile: $DIR/pki/kubelet-serving.crt
tlsPrivateKeyFile: $DIR/pki/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $DIR/pki/ca.crt}
authorization: {mode: Webhook}
clusterDNS: [$NODE_IP]
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
# A shared test machine: never evict for disk, never collect the imported images.
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
syncFrequency: 5s
nodeStatusUpdateFrequency: 5s
serializeImagePulls: false
YAML
  "$bin/kubelet" --config "$DIR/kubelet.yaml" --kubeconfig "$DIR/kubelet.kubeconfig" \
    --root-dir "$DIR/kubelet" --hostname-override "$NODE" --node-ip "$NODE_IP" \
    > "$DIR/logs/kubelet.log" 2>&1 &
  pid_save "$DIR/pids/kubelet" $!
}

start_kube_proxy() {
  local bin=$1 hp mp
  hp=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
  mp=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
  cat > "$DIR/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $DIR/kube-proxy.kubeconfig}
hostnameOverride: $NODE
mode: iptables
clusterCIDR: 10.244.0.0/24
healthzBindAddress: 127.0.0.1:$hp
metricsBindAddress: 127.0.0.1:$mp
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
  "$bin/kube-proxy" --config "$DIR/kube-proxy.yaml" > "$DIR/logs/kube-proxy.log" 2>&1 &
  pid_save "$DIR/pids/kube-proxy" $!
}

start_coredns() {
  local bin=$1 rp
  rp=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
  cat > "$DIR/Corefile" <<CORE
.:53 {
    bind $NODE_IP
    errors
    ready 127.0.0.1:$rp
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $DIR/kubeconfig e2e
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    forward . /etc/resolv.conf
    cache 5
    loop
}
CORE
  "$bin/coredns" -conf "$DIR/Corefile" > "$DIR/logs/coredns.log" 2>&1 &
  pid_save "$DIR/pids/coredns" $!
  wait_for coredns curl -fsS "http://127.0.0.1:$rp/ready"
}

node_ready() {
  "$CP_BIN/kubectl" --kubeconfig "$DIR/kubeconfig" get node "$NODE" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True
}

start() {
  packages
  stop_node
  local node_bin
  node_bin=$("$HERE/build-node.sh")
  network
  SEMANTIS_E2E_ADVERTISE=$NODE_IP bash "$HERE/control-plane.sh" start >/dev/null
  CP_BIN=$(sed -n 's#^SEMANTIS_E2E_BIN=##p' "$DIR/env")
  certs
  kubeconfig_for kubelet kubelet-client
  kubeconfig_for kube-proxy kube-proxy
  start_containerd
  bash "$HERE/images.sh" import "$SOCK"
  start_kubelet "$node_bin"
  start_kube_proxy "$node_bin"
  start_coredns "$node_bin"
  wait_for "node $NODE Ready" node_ready
  echo "SEMANTIS_NODE_SOCK=$SOCK" >> "$DIR/env"
  cat "$DIR/env"
}

case ${1:-} in
  start) start ;;
  stop) stop_node ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
