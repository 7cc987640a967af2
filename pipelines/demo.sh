#!/usr/bin/env bash
# The demo: every stage so far on a synthetic Market-1501 with the tiny (random-weight) presets.
# Its numbers exercise the pipeline; they are not results of the method.
set -euo pipefail
cd "$(dirname "$0")/.."
fc=.venv/bin/featcache
$fc --config pipelines/demo.yaml synth data/synth-market
$fc --config pipelines/demo.yaml extract
$fc info outputs/demo/market.h5
$fc eval --cache outputs/demo/market.h5 --model concat:clip-tiny,align-tiny --json outputs/demo/eval-concat.json --plots outputs/demo/plots-concat
if [ -f outputs/demo/gate/config.yaml ]; then resume=--resume; else resume=; fi
$fc train-gate --cache outputs/demo/market.h5 --out outputs/demo/gate --fusion moe-top1 $resume
$fc eval --cache outputs/demo/market.h5 --model gate:outputs/demo/gate --json outputs/demo/eval-gate.json --plots outputs/demo/plots-gate
