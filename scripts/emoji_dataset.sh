#!/usr/bin/env bash
# The real dataset of tests and the README: the 3,786 64×64 Noto emoji images of npm package
# emoji-datasource-google (images Apache-2.0), as a metadata table `skytrain curate` reads.
# Fetched with `npm pack` into .cache/emoji (never committed). Prints the table's path.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${EMOJI_VERSION:-16.0.0}"
DIR=.cache/emoji
mkdir -p "$DIR"
# Tests call this concurrently: one fetch at a time.
exec 9>"$DIR.lock"
flock 9
if [ ! -f "$DIR/package/emoji.json" ]; then
  mkdir -p "$DIR"
  (cd "$DIR" && npm pack --silent "emoji-datasource-google@$VERSION" >/dev/null && tar xzf "emoji-datasource-google-$VERSION.tgz" && rm -f ./*.tgz)
fi
python3 scripts/emoji_metadata.py "$DIR/package" "$DIR/emoji.jsonl" "$VERSION" >&2
echo "$DIR/emoji.jsonl"
