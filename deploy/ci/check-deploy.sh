#!/usr/bin/env bash
# `make check-deploy`: proves that what users deploy with works, on a machine with no Docker
# engine and no Kubernetes API server (shared/DESIGN.md section 5). Steps:
#   1. Debian packages: podman (with runc) and mmdebstrap, installed when missing.
#   2. hadolint on the Dockerfile; requirements-build.lock pins pyproject.toml's build requirements.
#   3. The Compose binary's `config -q` on docker-compose.yml and compose.demo.yml, and
#      docker-compose.yml refusing to start without its required variables.
#   4. kubernetes-validate --strict on every manifest under deploy/kubernetes (patches are
#      partial by nature: they are checked in the rendered overlays), and on `kubectl kustomize`
#      of the base and of each overlay, against the oldest and newest Kubernetes we support.
#   5. A stand-in for the Dockerfile's base image, built with mmdebstrap (no registry here) and
#      tagged with exactly the base's name; kept while its inputs are unchanged.
#   6. `podman build` of the real Dockerfile (layers cached between runs).
#   7. tests/deploy/run_image.py: the image run read-only, without capabilities, against the
#      Entra and Azure OpenAI stand-ins on loopback; then the compose.demo.yml service.
# It needs root and apt-get: where either is missing it fails, saying so; it never skips.
set -euo pipefail
cd "$(dirname "$0")/../.."

TOOLS=.venv-deploy/bin       # made by the Makefile from deploy/ci/requirements.lock
PROJECT=.venv/bin            # the project's own venv (the stand-ins, for the image run)
IMAGE=localhost/aoai-auth-proxy:check-deploy
K8S_VERSIONS=(1.29.0 1.37.0) # 1.29: native sidecars on by default; 1.37: the newest schema
APT_PACKAGES=(podman runc mmdebstrap)
export CONTAINERS_CONF=$PWD/deploy/ci/containers.conf

work=$(mktemp -d)            # rendered overlays and the build log; removed on exit
trap 'rm -rf "$work"' EXIT
started=$SECONDS
step_name=""
step_started=$SECONDS
timings=()

fail() {
    echo "check-deploy: FAILED${step_name:+ in '$step_name'}: $*" >&2
    exit 1
}
finish_step() {
    [ -n "$step_name" ] && timings+=("$(printf '%5d s  %s' $((SECONDS - step_started)) "$step_name")")
    return 0
}
step() {
    finish_step
    step_name=$1
    step_started=$SECONDS
    printf '\n== %s\n' "$step_name"
}

step "preconditions"
[ "$(id -u)" = 0 ] ||
    fail "must run as root: it installs Debian packages and runs rootful podman (CI runs as root)"
command -v apt-get >/dev/null && command -v dpkg-query >/dev/null ||
    fail "needs apt-get (Debian) to install podman and mmdebstrap"
for tool in hadolint kubectl kubernetes-validate; do
    [ -x "$TOOLS/$tool" ] || fail "$TOOLS/$tool is missing: run this through 'make check-deploy'"
done
[ -x "$PROJECT/python" ] || fail "$PROJECT/python is missing: run this through 'make check-deploy'"
compose=$("$TOOLS/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')
# The binary itself: the package's Python wrapper always exits 0, whatever Compose said.
[ -x "$compose" ] || fail "the Compose binary is not at $compose"
echo "root, apt-get, tools in $TOOLS, Compose binary $compose"

step "Debian packages (${APT_PACKAGES[*]})"
missing=()
for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
        missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt-get update -qq || fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >/dev/null || fail "apt-get install ${missing[*]} failed"
fi
for package in "${APT_PACKAGES[@]}"; do
    printf '%s %s\n' "$package" "$(dpkg-query -W -f='${Version}' "$package")"
done

step "hadolint Dockerfile"
"$TOOLS/hadolint" --version
"$TOOLS/hadolint" Dockerfile || fail "hadolint found problems in the Dockerfile"
echo "Dockerfile: no findings"
# The builder stage installs the build requirements from requirements-build.lock: they must be
# the ones pyproject.toml names, or the image would be built differently from `pip wheel .`.
mapfile -t requires < <("$PROJECT/python" -c 'import tomllib
for r in tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]: print(r)')
[ ${#requires[@]} -gt 0 ] || fail "pyproject.toml names no build requirements"
for requirement in "${requires[@]}"; do
    grep -q "^$requirement " requirements-build.lock ||
        fail "requirements-build.lock does not pin $requirement as pyproject.toml does; regenerate it (see its header)"
done
echo "requirements-build.lock pins ${requires[*]}, as pyproject.toml does"

step "compose config"
"$compose" version
# --env-file /dev/null: a developer's .env must not change what is checked.
"$compose" --env-file /dev/null -f compose.demo.yml config -q || fail "compose.demo.yml is invalid"
echo "compose.demo.yml: valid"
AZURE_CLIENT_ID=placeholder AZURE_TENANT_ID=placeholder API_BASE_URL=https://placeholder.openai.azure.com \
    "$compose" --env-file /dev/null -f docker-compose.yml config -q || fail "docker-compose.yml is invalid"
echo "docker-compose.yml: valid"
if env -u AZURE_CLIENT_ID -u AZURE_TENANT_ID -u API_BASE_URL \
    "$compose" --env-file /dev/null -f docker-compose.yml config -q 2>/dev/null; then
    fail "docker-compose.yml starts without AZURE_CLIENT_ID, AZURE_TENANT_ID and API_BASE_URL"
fi
echo "docker-compose.yml: refuses to start without its required variables"

step "kubernetes-validate --strict"
mapfile -t manifests < <(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml ! -name 'patch-*.yaml' | sort)
rendered=$work/rendered
mkdir "$rendered"
"$TOOLS/kubectl" version --client
for dir in deploy/kubernetes/base deploy/kubernetes/overlays/*/; do
    name=$(basename "$dir")
    "$TOOLS/kubectl" kustomize "$dir" >"$rendered/$name.yaml" || fail "kubectl kustomize $dir failed"
    # An image left as the bare name means an `images:` entry is missing for that overlay.
    if grep -qE 'image: aoai-auth-proxy$' "$rendered/$name.yaml"; then
        fail "$dir renders the unresolved image name aoai-auth-proxy (missing images: entry)"
    fi
done
for version in "${K8S_VERSIONS[@]}"; do
    "$TOOLS/kubernetes-validate" --strict --quiet -k "$version" "${manifests[@]}" "$rendered"/*.yaml ||
        fail "manifests do not validate against Kubernetes $version"
    echo "Kubernetes $version: ${#manifests[@]} manifests and $(ls "$rendered" | wc -l) rendered kustomizations valid"
done

step "stand-in base image"
# Every FROM that is not an earlier stage names the one external base the stand-in imitates.
mapfile -t bases < <(awk 'toupper($1) == "FROM" {
        for (i = 2; i <= NF; i++) if ($i !~ /^--/) { image = $i; break }
        if (!(image in stages)) print image
        if (toupper($(NF - 1)) == "AS") stages[$NF] = 1
    }' Dockerfile | sort -u)
[ ${#bases[@]} -eq 1 ] || fail "expected one base image in the Dockerfile, found: ${bases[*]}"
base=${bases[0]}
case $base in
*/*/*) ;;                                           # registry/namespace/name
*/*) case ${base%%/*} in *.* | *:* | localhost) ;; *) base=docker.io/$base ;; esac ;;
*) base=docker.io/library/$base ;;
esac
bash deploy/ci/build-base-image.sh "$base" || fail "could not build the stand-in base $base"

step "podman build"
log=$work/build.log
podman version --format 'podman {{.Client.Version}}'
# --pull=never: use the stand-in, never try a registry; --format docker keeps HEALTHCHECK.
if ! podman build --network host --pull=never --format docker --tag "$IMAGE" . >"$log" 2>&1; then
    tail -n 60 "$log"
    fail "podman build failed (last lines above)"
fi
podman image inspect --format '{{.Id}} {{.Size}} bytes, user {{.Config.User}}' "$IMAGE"
# Layers replaced by newer builds pile up as untagged images; a week's worth stays as build cache.
podman image prune --force --filter until=168h >/dev/null

step "run the image"
"$PROJECT/python" -m tests.deploy.run_image "$IMAGE" --compose "$compose" --demo-compose compose.demo.yml ||
    fail "the image did not behave (see above)"

finish_step
printf '\n== timings\n'
printf '%s\n' "${timings[@]}"
printf '%5d s  total\n' $((SECONDS - started))
echo "check-deploy: all steps passed"
