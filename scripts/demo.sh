#!/usr/bin/env bash
# README's demo command; the work is in tools/demo.sh (this folder is Forge's: it loads only its *.py files).
exec bash "$(dirname "${BASH_SOURCE[0]}")/../tools/demo.sh" "$@"
