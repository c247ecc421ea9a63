#!/usr/bin/env bash
# pipeserve from a shell, with no curl and no protos: the `pipeserve` command (pip install
# pipeserve, or the server's image) prints JSON that jq or a script can read.
# tests/test_client_examples.py runs this file against a live server.
set -euo pipefail
export PIPESERVE_TARGET=${PIPESERVE_TARGET:-localhost:8001}   # or unix:/run/pipeserve/pipeserve.sock
# export PIPESERVE_TOKEN=...                                  # when the server has --auth-token

pipeserve health --service readiness

pipeserve call sentiment-analysis "I love this"
pipeserve call text-classification "I like pizza" "I hate bugs" --param top_k=2 --indent 2

# One input per line on stdin; parameters parse as JSON where they can.
printf 'first sentence\nsecond sentence\n' | pipeserve call feature-extraction -p pooling=mean -p normalize=true > /dev/null

# Inputs that are objects: --json-inputs (flags go after the inputs).
pipeserve call question-answering \
  '{"question": "Where do I live?", "context": "My name is Sarah and I live in London"}' --json-inputs

# Failures print "error: <STATUS>: <message>" on stderr and exit 1.
if ! pipeserve call sentiment-analysis "x" --model no-such-model 2> /dev/null; then
  echo "no-such-model: refused, as it should be"
fi
