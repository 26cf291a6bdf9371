#!/usr/bin/env bash
# Install a local Slurm (slurm-wlm: slurmctld + slurmd + client tools) and munge on a Debian/Ubuntu
# machine, for the tests marked `slurm` (tests/support/slurm_cluster.py runs the cluster itself).
# Idempotent and non-interactive; skips in well under a second when everything is already installed.
# Must run as root.
set -euo pipefail

need=(slurmctld slurmd munged sinfo srun sbatch scontrol squeue scancel)

missing() {
    local cmd out=()
    for cmd in "${need[@]}"; do
        # The daemons live in /usr/sbin, which a non-login PATH may lack.
        command -v "$cmd" >/dev/null 2>&1 || [[ -x "/usr/sbin/$cmd" ]] || out+=("$cmd")
    done
    echo "${out[*]}"
}


if [[ -z "$(missing)" ]]; then
    echo "install-slurm: slurm and munge already installed; nothing to do"
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    echo "install-slurm: must run as root (the Slurm tests need root too); try: sudo bash $0" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-slurm: apt-get not found; only Debian/Ubuntu are supported (missing: $(missing))" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
packages=(slurm-wlm munge procps)
apt_install() {
    apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${packages[@]}"
}

# Package post-install scripts try to start the daemons; on a machine without an init system (a
# container) that fails or hangs, and the tests start their own. A policy-rc.d that denies service
# starts (exit 101) is the Debian way to prevent it; remove ours afterwards.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
fi
cleanup() { if [[ "$own_policy" -eq 1 ]]; then rm -f "$policy"; fi; }
trap cleanup EXIT

echo "install-slurm: installing ${packages[*]} (missing: $(missing))"
if ! apt_install; then
    echo "install-slurm: install failed; running apt-get update and retrying"
    apt-get update -q
    apt_install
fi

left="$(missing)"
if [[ -n "$left" ]]; then
    echo "install-slurm: still missing after install: $left" >&2
    exit 1
fi
echo "install-slurm: done ($(/usr/sbin/slurmctld -V 2>/dev/null || echo slurmctld))"
