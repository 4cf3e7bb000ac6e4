#!/usr/bin/env bash
# Starts (or stops) a loopback control plane for the end-to-end suite: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler and kwok (simulated nodes and kubelets), with
# certificates, service-account keys and an admin kubeconfig. Free ports are picked at start.
#
#   control-plane.sh start   prints KUBECONFIG=... (also written to $DIR/env)
#   control-plane.sh stop    stops everything; logs stay in $DIR/logs
#
# With SEMANTIS_E2E_ADVERTISE=<ip> (node.sh sets it) there is no kwok: the API server listens
# on every address and advertises <ip>, so pods on the real node reach it through the
# `kubernetes` Service, and the Node authorizer admits that node's kubelet.
set -euo pipefail

DIR=${SEMANTIS_E2E_DIR:-/tmp/semantis-e2e}
ADVERTISE=${SEMANTIS_E2E_ADVERTISE:-}
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/pids.sh
. "$HERE/../../scripts/pids.sh"

stop() {
  if [[ -d $DIR/pids ]]; then
    # Only the processes these files name, never whatever got their pid after a crash.
    local f pid pids=()
    for f in "$DIR"/pids/*; do
      [[ -e $f ]] || continue
      pid=$(pid_ours "$f" "$DIR")
      rm -f "$f"
      [[ -n $pid ]] || continue
      pids+=("$pid")
      kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    done
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

certs() {
  local d=$DIR/pki
  mkdir -p "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=semantis-e2e-ca" \
    -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  issue() { # name subject extensions
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$d/$1.key" -out "$d/$1.csr" 2>/dev/null
    printf '%s\n' "$3" > "$d/$1.ext"
    openssl x509 -req -in "$d/$1.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
      -days 3650 -extfile "$d/$1.ext" -out "$d/$1.crt" 2>/dev/null
  }
  issue apiserver "/CN=kube-apiserver" \
    "subjectAltName=IP:127.0.0.1,IP:10.0.0.1${ADVERTISE:+,IP:$ADVERTISE},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc"
  issue admin "/O=system:masters/CN=e2e-admin" "extendedKeyUsage=clientAuth"
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
}

kubeconfig() { # port
  local d=$DIR/pki
  cat > "$DIR/kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: https://127.0.0.1:$1
    certificate-authority: $d/ca.crt
users:
- name: admin
  user:
    client-certificate: $d/admin.crt
    client-key: $d/admin.key
contexts:
- name: e2e
  context: {cluster: e2e, user: admin, namespace: default}
current-context: e2e
KCFG
}

wait_healthy() { # url what
  for _ in $(seq 1 600); do
    if curl -fsS --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" --key "$DIR/pki/admin.key" "$1" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  echo "control-plane: $2 did not become healthy; see $DIR/logs" >&2
  return 1
}

start() {
  stop
  local bin; bin=$("$HERE/build-control-plane.sh")
  rm -rf "$DIR"
  mkdir -p "$DIR/logs" "$DIR/pids" "$DIR/etcd"
  certs
  local etcd_port peer_port api_port kcm_port sched_port kwok_port
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
  kcm_port=$(free_port); sched_port=$(free_port); kwok_port=$(free_port)
  kubeconfig "$api_port"

  "$bin/etcd" --name e2e --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "e2e=http://127.0.0.1:$peer_port" --unsafe-no-fsync \
    > "$DIR/logs/etcd.log" 2>&1 &
  pid_save "$DIR/pids/etcd" $!

  local bind_address=127.0.0.1
  [[ -n $ADVERTISE ]] && bind_address=0.0.0.0
  "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address "$bind_address" --advertise-address "${ADVERTISE:-127.0.0.1}" --secure-port "$api_port" \
    --cert-dir "$DIR/pki" --tls-cert-file "$DIR/pki/apiserver.crt" --tls-private-key-file "$DIR/pki/apiserver.key" \
    --client-ca-file "$DIR/pki/ca.crt" \
    --service-account-key-file "$DIR/pki/sa.pub" --service-account-signing-key-file "$DIR/pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-cluster-ip-range 10.0.0.0/24 --authorization-mode Node,RBAC --allow-privileged \
    --enable-admission-plugins NodeRestriction --kubelet-preferred-address-types InternalIP,Hostname \
    --kubelet-client-certificate "$DIR/pki/admin.crt" --kubelet-client-key "$DIR/pki/admin.key" \
    > "$DIR/logs/kube-apiserver.log" 2>&1 &
  pid_save "$DIR/pids/kube-apiserver" $!
  wait_healthy "https://127.0.0.1:$api_port/readyz" kube-apiserver

  "$bin/kube-controller-manager" --kubeconfig "$DIR/kubeconfig" \
    --authentication-kubeconfig "$DIR/kubeconfig" --authorization-kubeconfig "$DIR/kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" --leader-elect=false \
    --service-account-private-key-file "$DIR/pki/sa.key" --root-ca-file "$DIR/pki/ca.crt" \
    --controllers '*' --concurrent-gc-syncs 5 \
    > "$DIR/logs/kube-controller-manager.log" 2>&1 &
  pid_save "$DIR/pids/kube-controller-manager" $!

  "$bin/kube-scheduler" --kubeconfig "$DIR/kubeconfig" \
    --authentication-kubeconfig "$DIR/kubeconfig" --authorization-kubeconfig "$DIR/kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$sched_port" --leader-elect=false \
    > "$DIR/logs/kube-scheduler.log" 2>&1 &
  pid_save "$DIR/pids/kube-scheduler" $!

  if [[ -z $ADVERTISE ]]; then
    # kwok plays the kubelet for nodes annotated kwok.x-k8s.io/node=fake: pods turn Running and
    # Ready, Job pods complete, unless a test stage says otherwise.
    "$bin/kwok" --kubeconfig "$DIR/kubeconfig" \
      --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
      --config "$HERE/kwok.yaml" --server-address "127.0.0.1:$kwok_port" \
      > "$DIR/logs/kwok.log" 2>&1 &
    pid_save "$DIR/pids/kwok" $!
  fi

  echo "KUBECONFIG=$DIR/kubeconfig" > "$DIR/env"
  echo "SEMANTIS_E2E_BIN=$bin" >> "$DIR/env"
  cat "$DIR/env"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
