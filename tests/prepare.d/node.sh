#!/usr/bin/env bash
# The Node.js client's dependencies (@grpc/grpc-js, @grpc/proto-loader) for tests/test_node_client.py.
# Quick once node_modules matches package-lock.json; skipped (and those tests with it) without npm.
set -euo pipefail
cd "$(dirname "$0")/../../clients/node"
if ! command -v npm >/dev/null; then
  echo "npm not found: the Node.js client tests will be skipped"
  exit 0
fi
stamp=node_modules/.pipeserve-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "clients/node: node_modules matches package-lock.json"
  exit 0
fi
npm ci --no-audit --no-fund --loglevel=error
echo "$want" > "$stamp"
