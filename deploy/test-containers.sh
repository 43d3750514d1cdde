#!/usr/bin/env bash
# Build both fluxmesh images from deploy/Dockerfile with podman and run docker-compose.yml on the
# CPU with a tiny random model: health checks, one image generated from this host through the
# orchestrator's published port with the SDK, then everything taken down again.
#
#   sudo deploy/test-containers.sh            (rootful podman; tests/test_containers.py runs it)
#
# It builds offline from this machine's own files: a Debian base made with debootstrap from the
# machine's apt mirror, and the Python wheels (torch's CPU build included) fetched once by the
# host's pip into a wheel folder that podman mounts into the builds. The `stages` image gets the
# CPU torch base through the Dockerfile's TORCH_IMAGE argument; the CUDA base stays the default.
#
# Environment:
#   FLUXMESH_CONTAINER_CACHE  wheel folder and debootstrap work dir (default /var/cache/fluxmesh/containers)
#   PYTHON                    host Python with fluxmesh and pip (default python3)
#   SUITE                     Debian release of the base (default bookworm: Python 3.11)
# Images stay in podman's storage between runs (bases are rebuilt only when missing, the fluxmesh
# images on each run, from the layer cache); containers, networks and volumes are removed.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${FLUXMESH_CONTAINER_CACHE:-/var/cache/fluxmesh/containers}"
PYTHON="${PYTHON:-python3}"
SUITE="${SUITE:-bookworm}"
PY_VERSION="3.11"  # the suite's Python: the wheel folder is fetched for it
WORK="$(mktemp -d /tmp/fluxmesh-containers.XXXXXX)"
PROJECT="fluxmesh-test-$$"
BASE="localhost/fluxmesh-debian:${SUITE}"
started=$SECONDS

step() { echo "== [$((SECONDS - started))s] $*"; }
die() { echo "test-containers: $*" >&2; exit 1; }

for tool in podman podman-compose debootstrap; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
[ "$(id -u)" = 0 ] || die "needs root (rootful podman)"

# --- this machine's container settings, read now (not the user's compose file) --------------
# The engine may not raise limits beyond the hard ones this shell has (and setting nproc at the
# hard limit itself is refused here: 32768 as the recipe that works, or less); crun rejects some
# cgroup layouts that runc takes; without systemd, cgroupfs and file-based events.
nofile="$(ulimit -Hn)"
nproc="$(ulimit -Hu)"
[ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
cat > "$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
log_driver = "k8s-file"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"

compose() {
    podman-compose -p "$PROJECT" -f "$ROOT/docker-compose.yml" -f "$ROOT/docker-compose.cpu.yml" "$@"
}

container_of() {  # the running container of a compose service
    podman ps -q --filter "label=io.podman.compose.project=$PROJECT" \
        --filter "label=io.podman.compose.service=$1" | head -n1
}

cleanup() {
    local status=$?
    if [ "$status" != 0 ] && [ -n "$(podman ps -aq --filter "label=io.podman.compose.project=$PROJECT")" ]; then
        for service in encoder denoiser vae orchestrator; do
            echo "--- logs of $service"; compose logs --tail 30 "$service" 2>&1 || true
        done
    fi
    step "taking it down"
    compose down -v --timeout 10 >/dev/null 2>&1 || true
    # whatever compose left (a container from a failed start, the network, the volumes)
    podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman rm -f >/dev/null 2>&1 || true
    podman network ls -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman network rm -f >/dev/null 2>&1 || true
    podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman volume rm -f >/dev/null 2>&1 || true
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT

# --- the Debian base ------------------------------------------------------------------------
apt_mirror() {  # the machine's own Debian mirror, from its apt sources
    local uri=""
    uri="$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -m1 '/debian/\?$' || true)"
    [ -n "$uri" ] || uri="$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
        awk '{print $2}' | grep -m1 '/debian/\?$' || true)"
    echo "${uri:-http://deb.debian.org/debian}"
}

if ! podman image exists "$BASE"; then
    mirror="$(apt_mirror)"
    step "base image $BASE: debootstrap $SUITE from $mirror"
    rootfs="$CACHE/rootfs-$SUITE"
    rm -rf "$rootfs" && mkdir -p "$CACHE"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$rootfs" "$mirror" \
        > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
    # pip in a venv (Debian's own Python refuses system-wide pip installs, PEP 668)
    chroot "$rootfs" python3 -m venv /opt/venv
    # HTTPS from the container goes where the host's does: trust the host's CAs (a proxy may re-sign)
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["python3"]' - "$BASE" >/dev/null
    rm -rf "$rootfs"
fi

# --- the wheel folder: every wheel the images install, torch's CPU build among them ----------
torch_version="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
wheels="$CACHE/wheels-py$PY_VERSION"
stamp="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-$torch_version"
if [ "$(cat "$wheels/.stamp" 2>/dev/null)" != "$stamp" ]; then
    step "wheels for Python $PY_VERSION into $wheels (torch $torch_version, as this host has it)"
    rm -rf "$wheels" && mkdir -p "$wheels"
    platforms=()
    for p in manylinux_2_36 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
             manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1 linux; do
        platforms+=(--platform "${p}_x86_64")
    done
    "$PYTHON" -m pip download --quiet --dest "$wheels" --only-binary=:all: --python-version "$PY_VERSION" \
        --implementation cp "${platforms[@]}" \
        "torch==$torch_version" "$ROOT[stages]" "hatchling>=1.26" "pip" "setuptools" "wheel" \
        > "$WORK/pip-download.log" 2>&1 || { grep -v "is ignored" "$WORK/pip-download.log" | tail -20; die "pip download failed"; }
    rm -f "$wheels"/fluxmesh-*  # the project itself is built from the sources in the build
    echo "$stamp" > "$wheels/.stamp"
fi
pip_flags="--no-index --find-links /wheels"

torch_base="localhost/fluxmesh-torch:${torch_version//+/-}"
if ! podman image exists "$torch_base"; then
    step "torch base $torch_base"
    mkdir -p "$WORK/empty"
    printf 'FROM %s\nRUN pip install --no-cache-dir %s "torch==%s"\n' "$BASE" "$pip_flags" "$torch_version" \
        > "$WORK/Containerfile.torch"
    podman build --quiet --volume "$wheels:/wheels:ro" -f "$WORK/Containerfile.torch" -t "$torch_base" \
        "$WORK/empty" >/dev/null
fi

# --- the two images, exactly from deploy/Dockerfile -------------------------------------------
build() {  # target tag build-args...
    local target="$1" tag="$2" previous; shift 2
    step "build $tag (target $target)"
    previous="$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)"
    podman build --quiet --volume "$wheels:/wheels:ro" --build-arg PIP_INSTALL_FLAGS="$pip_flags" "$@" \
        -f "$ROOT/deploy/Dockerfile" --target "$target" -t "$tag" "$ROOT" >/dev/null
    echo "   $(podman image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MiB", $1 / 1048576}')"
    # the image this tag named before, now untagged: ours to remove (layers it shares stay)
    if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' "$tag")" ]; then
        podman rmi "$previous" >/dev/null 2>&1 || true
    fi
}
build orchestrator localhost/fluxmesh:latest --build-arg PYTHON_IMAGE="$BASE"
build stages localhost/fluxmesh-stages:latest --build-arg TORCH_IMAGE="$torch_base"

# --- docker-compose.yml + the CPU override, on a tiny model ----------------------------------
mkdir -p "$WORK/secrets"
"$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' > "$WORK/secrets/stage-token"
"$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' > "$WORK/secrets/client-tokens"
export FLUXMESH_SECRETS="$WORK/secrets" MODEL=/models/tiny FLUXMESH_BIND=127.0.0.1
PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export PORT
step "compose project $PROJECT"

step "tiny model into the models volume (fluxmesh tiny-model, in the stages image)"
compose run --rm encoder tiny-model /models/tiny > "$WORK/tiny-model.log" 2>&1 ||
    { tail -20 "$WORK/tiny-model.log"; die "tiny-model failed"; }

wait_healthy() {  # service timeout: poll its compose health check (nothing runs them without systemd)
    local service="$1" deadline=$((SECONDS + $2)) id
    while :; do
        id="$(container_of "$service")"
        if [ -n "$id" ] && podman healthcheck run "$id" >/dev/null 2>&1; then
            status="$(podman inspect --format '{{.State.Health.Status}}' "$id")"
            [ "$status" = healthy ] || die "$service: health check passed but podman says '$status'"
            step "$service healthy"
            return 0
        fi
        [ "$SECONDS" -lt "$deadline" ] || die "$service not healthy after $2 s"
        sleep 2
    done
}

# podman-compose skips depends_on's service_healthy, so start in order: stages, then orchestrator.
step "compose up: encoder denoiser vae"
compose up -d encoder denoiser vae > "$WORK/up.log" 2>&1 || { tail -20 "$WORK/up.log"; die "compose up failed"; }
for service in encoder denoiser vae; do wait_healthy "$service" 240; done
step "compose up: orchestrator (published on 127.0.0.1:$PORT)"
compose up -d --no-deps orchestrator >> "$WORK/up.log" 2>&1 || { tail -20 "$WORK/up.log"; die "compose up failed"; }
wait_healthy orchestrator 120

step "generate through 127.0.0.1:$PORT with the SDK, from the host"
"$PYTHON" - "127.0.0.1:$PORT" "$WORK/secrets/client-tokens" <<'EOF'
import sys
from pathlib import Path

from fluxmesh.client import Client, FluxmeshError

address, token = sys.argv[1], Path(sys.argv[2]).read_text().strip()
with Client(address, token=token, timeout=120) as client:
    result = client.generate("a red fox in the snow", width=64, height=64, steps=2, seed=7)
    assert result.image.size == (64, 64) and result.image_data[0].startswith(b"\x89PNG"), result
    print(f"   image {result.image.size}, seed {result.seed}, "
          f"encode {result.timings.encode:.2f}s denoise {result.timings.denoise:.2f}s decode {result.timings.decode:.2f}s")
with Client(address, timeout=30) as anonymous:  # the published port demands a client token
    try:
        anonymous.generate("a red fox", width=64, height=64, steps=1)
    except FluxmeshError as error:
        assert error.code.name == "UNAUTHENTICATED", error
        print("   without a token: UNAUTHENTICATED")
    else:
        raise SystemExit("the orchestrator served a caller without a token")
EOF

step "stages refuse calls without the stage token (from inside the orchestrator's network)"
orchestrator="$(container_of orchestrator)"
podman exec -i "$orchestrator" python - <<'EOF'
import grpc
from fluxmesh.v1 import common_pb2, encoder_pb2_grpc

with grpc.insecure_channel("encoder:50051") as channel:
    try:
        encoder_pb2_grpc.TextEncoderStub(channel).Info(common_pb2.InfoRequest(), timeout=20)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        print("   encoder without the stage token: UNAUTHENTICATED")
    else:
        raise SystemExit("a stage served a caller without the stage token")
EOF
step "done"
