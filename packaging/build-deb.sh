#!/usr/bin/env bash
# Build the Debian package from this checkout:  bash packaging/build-deb.sh [OUTDIR]
#
# dpkg-buildpackage wants debian/ at the top of the source tree; ours lives in
# packaging/debian/ so the checkout stays a plain Python project.  The files
# git knows (tracked, and untracked ones not ignored) are copied into a
# temporary tree with packaging/debian as debian/, built there with
# 'dpkg-buildpackage -us -uc -b', and the .deb is copied to OUTDIR (default:
# the current directory).  Needs: debhelper dh-python python3-all (scripts/setup.sh).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(realpath "${1:-.}")"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

mkdir -p "$WORK/src"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done |
    tar --null -T - -cf -) | tar -C "$WORK/src" -xf -
rm -rf "$WORK/src/debian"
cp -r "$WORK/src/packaging/debian" "$WORK/src/debian"
(cd "$WORK/src" && dpkg-buildpackage -us -uc -b >"$WORK/build.log" 2>&1) || {
    tail -40 "$WORK/build.log" >&2
    exit 1
}
mkdir -p "$OUT"
cp "$WORK"/*.deb "$OUT"/
ls "$WORK"/*.deb | xargs -n1 basename
