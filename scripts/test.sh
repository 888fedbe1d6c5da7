#!/usr/bin/env bash
# README's test command; the work is in tools/test.sh (this folder is Forge's: it loads only its *.py files).
exec bash "$(dirname "${BASH_SOURCE[0]}")/../tools/test.sh" "$@"
