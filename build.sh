#!/usr/bin/env bash
# Build the chashd image (one image, both roles), and optionally push it and deploy it to Kubernetes.
#
#   ./build.sh                                      build chashd:<git short hash> (and chashd:latest)
#   REGISTRY=registry.example.com ./build.sh        tag as registry.example.com/chashd:<tag>
#   REGISTRY=registry.example.com PUSH=true ./build.sh              ...and push both tags
#   REGISTRY=registry.example.com PUSH=true DEPLOY=true ./build.sh  ...and kubectl apply -k k8s/ with that image
#   TAG=v1.0.0 ./build.sh                           tag v1.0.0 instead of the git short hash
#
# Other variables: IMAGE_NAME (default chashd), ENGINE (docker or podman; default: whichever is installed,
# docker first), NAMESPACE (default consistent-hashing), KUBECTL (default kubectl), SECRETS_DIR (default .secrets).
# Every run also makes the secrets docker-compose.yml reads, when they are missing: SECRETS_DIR/raft-password and
# SECRETS_DIR/token, random (the directory mode 0700, git-ignored; existing files are kept).
# DEPLOY=true also creates the Secret chashd-secrets (raft-password, token) with random values when the
# namespace has none; an existing Secret is left as it is.
# Every step stops the script at its first failure, with a line saying which step failed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$ROOT"

say() { printf 'build.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Run one step; on failure, name it and stop.
step() {
    local what=$1
    shift
    say "$what: $*"
    "$@" || die "$what failed (exit status $?): $*"
}

is_true() {
    case "$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]')" in
        true | yes | 1 | on) return 0 ;;
        false | no | 0 | off | "") return 1 ;;
        *) die "$2 must be true or false, not '$1'" ;;
    esac
}

IMAGE_NAME=${IMAGE_NAME:-chashd}
REGISTRY=${REGISTRY:-}
REGISTRY=${REGISTRY%/}
NAMESPACE=${NAMESPACE:-consistent-hashing}
KUBECTL=${KUBECTL:-kubectl}
PUSH=${PUSH:-false}
DEPLOY=${DEPLOY:-false}
is_true "$PUSH" PUSH && push=1 || push=0
is_true "$DEPLOY" DEPLOY && deploy=1 || deploy=0

# -- the container engine --------------------------------------------------------------------------
if [ -n "${ENGINE:-}" ]; then
    case "$ENGINE" in docker | podman) ;; *) die "ENGINE must be docker or podman, not '$ENGINE'" ;; esac
    command -v "$ENGINE" > /dev/null || die "ENGINE=$ENGINE, but $ENGINE is not installed"
elif command -v docker > /dev/null; then
    ENGINE=docker
elif command -v podman > /dev/null; then
    ENGINE=podman
else
    die "neither docker nor podman is installed; install one of them (or set ENGINE)"
fi

# -- the tag ---------------------------------------------------------------------------------------
if [ -z "${TAG:-}" ]; then
    command -v git > /dev/null || die "TAG is not set and git is not installed to take the commit's short hash"
    TAG=$(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null) \
        || die "TAG is not set and $ROOT is not a git checkout with a commit; set TAG (e.g. TAG=v1.0.0)"
fi
[[ "$TAG" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "TAG '$TAG' is not a valid image tag"

if [ -n "$REGISTRY" ]; then
    REPOSITORY="$REGISTRY/$IMAGE_NAME"
else
    REPOSITORY="$IMAGE_NAME"
fi
IMAGE="$REPOSITORY:$TAG"

if [ "$push" = 1 ] && [ -z "$REGISTRY" ]; then
    die "PUSH=true needs REGISTRY (the registry to push $IMAGE_NAME:$TAG to)"
fi
if [ "$deploy" = 1 ]; then
    command -v "$KUBECTL" > /dev/null || die "DEPLOY=true, but $KUBECTL is not installed"
fi

# -- the Compose secrets (see SECURITY.md) ----------------------------------------------------------
SECRETS_DIR=${SECRETS_DIR:-$ROOT/.secrets}
random_hex() { od -An -tx1 -N32 /dev/urandom | tr -d ' \n'; }
if [ ! -d "$SECRETS_DIR" ]; then
    (umask 077 && mkdir -p "$SECRETS_DIR") || die "cannot create the directory $SECRETS_DIR for the Compose secrets"
fi
for secret in raft-password token; do
    [ -s "$SECRETS_DIR/$secret" ] && continue
    value=$(random_hex) && [ ${#value} -eq 64 ] || die "cannot read random bytes from /dev/urandom"
    # Readable inside the containers (uid 10001 reads the bind-mounted file); the 0700 directory keeps other
    # users of this host out.
    (umask 022 && printf '%s\n' "$value" > "$SECRETS_DIR/$secret") || die "cannot write $SECRETS_DIR/$secret"
    say "made a random $secret in $SECRETS_DIR/$secret (docker-compose.yml reads it)"
done

# -- build, push -----------------------------------------------------------------------------------
revision=$(git -C "$ROOT" rev-parse HEAD 2> /dev/null || echo unknown)
step "build" "$ENGINE" build --file Dockerfile --tag "$IMAGE" --tag "$REPOSITORY:latest" \
    --label "org.opencontainers.image.version=$TAG" --label "org.opencontainers.image.revision=$revision" .

if [ "$push" = 1 ]; then
    step "push" "$ENGINE" push "$IMAGE"
    step "push" "$ENGINE" push "$REPOSITORY:latest"
fi

# -- deploy ----------------------------------------------------------------------------------------
if [ "$deploy" = 1 ]; then
    if [ "$push" = 0 ]; then
        say "note: $IMAGE was not pushed; the cluster must already have it (kind load docker-image $IMAGE," \
            "or minikube image load $IMAGE)"
    fi
    # The Raft password and the control-plane token: created once, random, never in the repository.
    if ! "$KUBECTL" get namespace "$NAMESPACE" > /dev/null 2>&1; then
        step "create namespace" "$KUBECTL" apply -f k8s/namespace.yaml
    fi
    if ! "$KUBECTL" --namespace "$NAMESPACE" get secret chashd-secrets > /dev/null 2>&1; then
        say "creating the Secret chashd-secrets in $NAMESPACE with a random Raft password and token"
        raft_password=$(random_hex) && token=$(random_hex) && [ ${#raft_password} -eq 64 ] && [ ${#token} -eq 64 ] \
            || die "cannot read random bytes from /dev/urandom"
        "$KUBECTL" --namespace "$NAMESPACE" create secret generic chashd-secrets \
            --from-literal=raft-password="$raft_password" --from-literal=token="$token" > /dev/null \
            || die "create secret failed: $KUBECTL --namespace $NAMESPACE create secret generic chashd-secrets"
    fi
    # k8s/ as it is, with the image just built: a throwaway overlay beside it (kustomize wants a relative path).
    overlay=$(mktemp -d "$ROOT/.deploy-overlay.XXXXXX") || die "cannot create a temporary directory in $ROOT"
    trap 'rm -rf "$overlay"' EXIT
    cat > "$overlay/kustomization.yaml" << EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../k8s
images:
  - name: chashd
    newName: $REPOSITORY
    newTag: "$TAG"
EOF
    step "deploy" "$KUBECTL" apply -k "$overlay"
    say "deployed $IMAGE to namespace $NAMESPACE; watch it with: $KUBECTL get pods -n $NAMESPACE -w"
fi

say "done: $IMAGE"
