#!/usr/bin/env bash
# Kept for old instructions: the demo is `featcache demo` (pipelines/demo.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/featcache demo "$@"
