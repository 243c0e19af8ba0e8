#!/usr/bin/env bash
# bench/http.sh: kept for old habits; the one benchmark driver is bench/run.sh.
exec "$(dirname "${BASH_SOURCE[0]}")/run.sh" --suite http "$@"
