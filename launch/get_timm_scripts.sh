#!/usr/bin/env bash
# Copies timm's train.py and benchmark.py (the pip package does not ship them) into launch/peer/timm/,
# for the peer phase of launch/gpu_check.py (launch/gpu_peer.py). launch/peer/ is git-ignored: nothing
# of timm's code is committed to distvit. On the device machine, carry it: carry ["launch/peer"].
#
#   bash launch/get_timm_scripts.sh [GIT_DIR_OR_TIMM_CHECKOUT_OR_URL] [REF]
#
# The source is a timm git repository: a bare git directory, a checkout, or a URL to clone (default:
# https://github.com/huggingface/pytorch-image-models.git). REF defaults to the tag v<installed timm
# version> where the repository has it, else HEAD (timm's scripts use its library's newer APIs, so an
# older timm may not run a newer ref's scripts: the copied scripts are checked to import and parse their
# arguments with the installed timm). The ref, commit and sha256 of each file go to launch/peer/timm/SOURCE.txt.
# PYTHON (default python3) is the interpreter whose timm is checked; TIMM_SCRIPTS_DEST (default
# launch/peer/timm) where the scripts go.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dest=${TIMM_SCRIPTS_DEST:-$here/peer/timm}
source_repo=${1:-https://github.com/huggingface/pytorch-image-models.git}
python=${PYTHON:-python3}
scratch=""
cleanup() { if [[ -n $scratch ]]; then rm -rf "$scratch"; fi; }
trap cleanup EXIT

if [[ -d $source_repo ]]; then
    git_dir=$(git -C "$source_repo" rev-parse --absolute-git-dir) || {
        echo "get_timm_scripts.sh: $source_repo is not a git repository" >&2
        exit 2
    }
else
    scratch=$(mktemp -d)
    git_dir="$scratch/timm.git"
    echo "cloning $source_repo (bare, blobs on demand)"
    git clone --quiet --bare --filter=blob:none "$source_repo" "$git_dir"
fi

installed=$("$python" -c 'import timm; print(timm.__version__)' 2>/dev/null || true)
if [[ $# -ge 2 ]]; then
    ref=$2
elif [[ -n $installed ]] && git --git-dir="$git_dir" rev-parse -q --verify "refs/tags/v$installed^{commit}" >/dev/null; then
    ref="v$installed"
else
    ref=HEAD
    echo "no tag v${installed:-?} (the installed timm) in $source_repo: taking HEAD"
fi
commit=$(git --git-dir="$git_dir" rev-parse --verify "$ref^{commit}")
at_ref=$(git --git-dir="$git_dir" show "$commit:timm/version.py" | sed -n "s/^__version__ = ['\"]\(.*\)['\"].*/\1/p")

mkdir -p "$dest"
for name in train.py benchmark.py; do
    git --git-dir="$git_dir" show "$commit:$name" >"$dest/$name"
done
{
    echo "repository: $source_repo"
    echo "ref: $ref"
    echo "commit: $commit"
    echo "timm version at the commit: ${at_ref:-unknown}"
    echo "timm installed when copied: ${installed:-none}"
    echo "copied: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    for name in train.py benchmark.py; do
        echo "sha256 $name: $(sha256sum "$dest/$name" | cut -d' ' -f1)"
    done
} >"$dest/SOURCE.txt"
cat "$dest/SOURCE.txt"

# the scripts import timm's library and parse their arguments: --help checks both with this timm
for name in train.py benchmark.py; do
    if ! "$python" "$dest/$name" --help >/dev/null 2>"$dest/$name.help-error"; then
        echo "get_timm_scripts.sh: $name of $ref does not run with timm ${installed:-(not installed)}:" >&2
        tail -n 5 "$dest/$name.help-error" >&2
        echo "pass an older REF (a tag v1.0.N no newer than the installed timm)" >&2
        exit 1
    fi
    rm -f "$dest/$name.help-error"
done
echo "copied to $dest (git-ignored; carry launch/peer to the device machine)"
