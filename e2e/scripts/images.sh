#!/usr/bin/env bash
# Builds the images the real node runs, with buildah and without any registry, and imports them
# into the node's containerd.
#
#   images.sh build            builds what is missing; prints `name tarball` lines
#   images.sh import SOCKET    build, then import each image into containerd (namespace k8s.io)
#                              unless it already holds that image
#
# - pause: the pod sandbox (e2e/images/pause.c, static), the only file in its image.
# - base: a root filesystem made from this machine's Debian packages: the C runtime the Rust
#   binaries link (ldd), CA certificates, /etc/passwd with the distroless `nonroot` user
#   (65532), a shell and the few tools the Dockerfiles' build step uses.
# - redis: base plus Debian's redis-server and redis-cli; the operator's StatefulSet runs it
#   through `sh -c` and probes it with redis-cli.
# - semantis-dataplane, semantis-operator: Dockerfile.dataplane and Dockerfile.operator with
#   BUILDER=RUNTIME=base and PREBUILT=prebuilt: the binaries `make test` already built
#   (CARGO_TARGET_DIR/debug, stripped) and the model from scripts/fetch-model.sh.
#
# Each image is saved as a docker-archive under ~/.cache/semantis/e2e/images/, named by a hash
# of its inputs, so an unchanged input costs nothing.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${SEMANTIS_CACHE:-$HOME/.cache/semantis}
OUT=$CACHE/e2e/images
TARGET=${CARGO_TARGET_DIR:-$CACHE/target}
PROFILE=${SEMANTIS_IMAGE_PROFILE:-debug}
REPO=localhost/semantis
BUILDAH=(buildah --root "$CACHE/e2e/buildah/root" --runroot "${SEMANTIS_E2E_DIR:-/tmp/semantis-e2e}-buildah" --storage-driver overlay)

log() { echo "images: $*" >&2; }

need() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v gcc >/dev/null || missing+=(gcc)
  command -v strip >/dev/null || missing+=(binutils)
  [[ -e /usr/share/ca-certificates ]] || missing+=(ca-certificates)
  if ((${#missing[@]})); then
    log "installing ${missing[*]} from Debian's packages"
    apt-get install -y -qq "${missing[@]}" >&2 || { apt-get update -qq >&2 && apt-get install -y -qq "${missing[@]}" >&2; }
  fi
}

hash() { sha256sum | cut -c1-16; }

pkgs() { dpkg-query -W -f '${Package}=${Version}\n' "$@" 2>/dev/null; }

# Copies each program and every library it loads (ldd) into the root filesystem DIR.
rootfs_add() {
  local dir=$1; shift
  local f lib
  for f in "$@"; do
    install -D -m 0755 "$(readlink -f "$f")" "$dir$f"
    while read -r lib; do
      if [[ -n $lib && ! -e $dir$lib ]]; then install -D -m 0755 "$(readlink -f "$lib")" "$dir$lib"; fi
    done < <(ldd "$f" 2>/dev/null | sed -n 's#.*=> \(/[^ ]*\) .*#\1#p; s#^\s*\(/[^ ]*\) .*#\1#p')
  done
}


save() { # image tarball: replaces older tarballs of the same image
  local stem=${2%-*.tar}
  rm -f "$stem"-*.tar "$2.part"
  "${BUILDAH[@]}" push -q "$1" "docker-archive:$2.part:$1" >&2
  mv "$2.part" "$2"
}

pause_image() {
  local key tar
  key=$( (cat "$ROOT/e2e/images/pause.c"; gcc --version | head -1) | hash)
  tar=$OUT/pause-$key.tar
  [[ -s $tar ]] && { echo "pause $tar"; return; }
  log "building pause"
  local ctx; ctx=$(mktemp -d)
  gcc -O2 -static -s -o "$ctx/pause" "$ROOT/e2e/images/pause.c"
  local c; c=$("${BUILDAH[@]}" from scratch)
  "${BUILDAH[@]}" copy "$c" "$ctx/pause" /pause >/dev/null
  "${BUILDAH[@]}" config --entrypoint '["/pause"]' --user 65535:65535 "$c"
  "${BUILDAH[@]}" commit -q --rm "$c" "$REPO/pause:e2e" >/dev/null
  save "$REPO/pause:e2e" "$tar"
  rm -rf "$ctx"
  echo "pause $tar"
}

BASE_TOOLS=(/bin/sh /bin/cp /bin/mkdir /bin/cat /bin/ls /bin/rm /bin/grep /bin/sleep)
base_image() {
  local key tar
  key=$( (cat "$0"; pkgs libc6 libgcc-s1 libstdc++6 coreutils dash grep ca-certificates) | hash)
  BASE=$REPO/base:$key
  tar=$OUT/base-$key.tar
  if "${BUILDAH[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then return; fi
  if [[ -s $tar ]]; then
    "${BUILDAH[@]}" pull -q "docker-archive:$tar" >/dev/null
    return
  fi
  log "building base from Debian's packages"
  local fs; fs=$(mktemp -d)
  rootfs_add "$fs" "${BASE_TOOLS[@]}"
  # What the Rust binaries link (ldd of the dataplane: libstdc++, libgcc_s, libm, libmvec, libc).
  local lib
  for lib in /lib/x86_64-linux-gnu/{libstdc++.so.6,libgcc_s.so.1,libm.so.6,libmvec.so.1,libc.so.6} /lib64/ld-linux-x86-64.so.2; do
    install -D -m 0755 "$(readlink -f "$lib")" "$fs$lib"
  done
  mkdir -p "$fs/etc/ssl/certs" "$fs/tmp" "$fs/home/nonroot"
  chmod 1777 "$fs/tmp"
  cp /etc/ssl/certs/ca-certificates.crt "$fs/etc/ssl/certs/"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$fs/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' > "$fs/etc/group"
  printf 'hosts: files dns\n' > "$fs/etc/nsswitch.conf"
  chown 65532:65532 "$fs/home/nonroot"
  local c; c=$("${BUILDAH[@]}" from scratch)
  "${BUILDAH[@]}" copy "$c" "$fs" / >/dev/null
  "${BUILDAH[@]}" commit -q --rm "$c" "$BASE" >/dev/null
  save "$BASE" "$tar"
  rm -rf "$fs"
}

redis_image() {
  local key tar
  key=$( (echo "$BASE"; pkgs redis-server redis-tools) | hash)
  tar=$OUT/redis-$key.tar
  [[ -s $tar ]] && { echo "redis $tar"; return; }
  log "building redis from Debian's redis-server"
  local fs; fs=$(mktemp -d)
  rootfs_add "$fs" /usr/bin/redis-server /usr/bin/redis-cli
  mkdir -p "$fs/data"
  chmod 0777 "$fs/data"
  local c; c=$("${BUILDAH[@]}" from "$BASE")
  "${BUILDAH[@]}" copy "$c" "$fs" / >/dev/null
  "${BUILDAH[@]}" config --cmd '["redis-server"]' --workingdir /data --port 6379 "$c"
  "${BUILDAH[@]}" commit -q --rm "$c" "$REPO/redis:e2e" >/dev/null
  save "$REPO/redis:e2e" "$tar"
  rm -rf "$fs"
  echo "redis $tar"
}

# name dockerfile binary [model]
semantis_image() {
  local name=$1 dockerfile=$2 bin=$TARGET/$PROFILE/$1 model=${4:-}
  [[ -x $bin ]] || { log "$bin is missing: build it first (cargo test --workspace --no-run)"; exit 1; }
  local key tar
  key=$( (echo "$BASE"; cat "$ROOT/$dockerfile"; sha256sum "$bin"; [[ -z $model ]] || (cd "$model" && find . -type f -print0 | sort -z | xargs -0 sha256sum)) | hash)
  tar=$OUT/$name-$key.tar
  [[ -s $tar ]] && { echo "$name $tar"; return; }
  log "building $name from $dockerfile ($PROFILE binary)"
  local ctx; ctx=$(mktemp -d)
  mkdir -p "$ctx/prebuilt"
  strip -o "$ctx/prebuilt/$name" "$bin"
  if [[ -n $model ]]; then
    mkdir -p "$ctx/prebuilt/models"
    cp -R "$model" "$ctx/prebuilt/models/"
    chmod -R a+rX "$ctx/prebuilt/models"
  fi
  "${BUILDAH[@]}" bud -q --layers=false -f "$ROOT/$dockerfile" \
    --build-arg "BUILDER=$BASE" --build-arg "RUNTIME=$BASE" --build-arg PREBUILT=prebuilt \
    -t "$REPO/$name:e2e" "$ctx" >/dev/null
  save "$REPO/$name:e2e" "$tar"
  rm -rf "$ctx"
  echo "$name $tar"
}

build() {
  need
  mkdir -p "$OUT"
  local model; model=$(bash "$ROOT/scripts/fetch-model.sh")
  pause_image
  base_image
  redis_image
  semantis_image semantis-dataplane Dockerfile.dataplane "" "$model"
  semantis_image semantis-operator Dockerfile.operator
}

import() { # socket
  local sock=$1 name tar ref id
  build | while read -r name tar; do
    ref=$REPO/$name:e2e
    id=$(basename "$tar" .tar)
    # The tarball's name is recorded as a label on the image, so an unchanged image is skipped.
    if ctr --address "$sock" -n k8s.io images ls -q "labels.\"semantis.dev/input\"==$id" 2>/dev/null | grep -qx "$ref"; then
      continue
    fi
    log "importing $ref"
    ctr --address "$sock" -n k8s.io images import --no-unpack "$tar" >/dev/null
    ctr --address "$sock" -n k8s.io images label "$ref" "semantis.dev/input=$id" >/dev/null
  done
}

case ${1:-} in
  build) build ;;
  import) import "${2:?usage: images.sh import SOCKET}" ;;
  *) echo "usage: $0 build | import SOCKET" >&2; exit 2 ;;
esac
