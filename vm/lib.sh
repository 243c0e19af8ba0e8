# Shared helpers for vm/*.sh (sourced, not executed).
# shellcheck shell=bash

VM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VM_CACHE="${UBLK_VM_CACHE:-/var/cache/ublk-http-vm}"

vm_log() { echo "[vm] $*" >&2; }
vm_die() { echo "[vm] ERROR: $*" >&2; exit 1; }

vm_wait_apt() {
    while pgrep -x apt-get >/dev/null || pgrep -x dpkg >/dev/null; do sleep 3; done
}

# vm_ensure CMD:PKG ...  -- installs PKG when CMD (a command name or an
# absolute path) is missing.  apt-get update only runs when needed.
vm_ensure() {
    local spec cmd pkg missing=()
    for spec in "$@"; do
        cmd="${spec%%:*}"; pkg="${spec#*:}"
        if [[ "$cmd" == /* ]]; then [[ -e "$cmd" ]] && continue
        else command -v "$cmd" >/dev/null 2>&1 && continue
        fi
        missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    # de-duplicate
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    [[ $(id -u) -eq 0 ]] || vm_die "missing packages (${missing[*]}) and not root"
    mkdir -p "$VM_CACHE"
    local log="$VM_CACHE/apt-install.log"
    vm_log "installing: ${missing[*]} (log: $log)"
    export DEBIAN_FRONTEND=noninteractive
    vm_wait_apt
    {
        apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"
    } >"$log" 2>&1 || { tail -n 60 "$log" >&2; vm_die "apt-get install ${missing[*]} failed"; }
}
