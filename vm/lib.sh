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

# ---- staging a guest root (used by initramfs.sh and run.sh) -----------------
# Set VM_STAGE to the staging root first.  VM_HAVE holds the guest paths
# staged so far; VM_BASE the paths a base initramfs already has (libraries
# there are not staged again; pre-load it from the base's .manifest);
# VM_LIBDIRS collects the directories of staged libraries.
declare -gA VM_HAVE=() VM_BASE=() VM_LIBDIRS=()

vm_stage_file() { # SRC DST: copy a file (dereferenced) or a directory tree
    local src="$1" dst="$2"
    [[ -n "${VM_HAVE[$dst]:-}" ]] && return 0
    VM_HAVE[$dst]=1
    vm_stage_safe "$dst"
    mkdir -p "$VM_STAGE$(dirname "$dst")"
    if [[ -d "$src" ]]; then
        mkdir -p "$VM_STAGE$dst"
        cp -a "$src/." "$VM_STAGE$dst/"
    else
        # Never write through a symlink already staged at DST (it may point
        # at a host path): replace it.
        rm -f "$VM_STAGE$dst"
        cp -L --preserve=mode "$src" "$VM_STAGE$dst"
    fi
}

vm_stage_safe() { # DST: refuse a staging target that resolves outside the stage
    local stage
    [[ -n "${VM_STAGE:-}" && "$VM_STAGE" == /*/* ]] || vm_die "VM_STAGE not set"
    stage="$(realpath "$VM_STAGE")"
    [[ "$(realpath -m "$VM_STAGE$(dirname "$1")")/" == "$stage/"* ]] \
        || vm_die "staging $1 would escape $VM_STAGE (via $(realpath -m "$VM_STAGE$(dirname "$1")"))"
    if [[ -d "$VM_STAGE$1" ]]; then
        [[ "$(realpath "$VM_STAGE$1")/" == "$stage/"* ]] || vm_die "staging $1 would escape $VM_STAGE"
    fi
}

vm_stage_link() { # TARGET DST: create a symlink in the stage
    local target="$1" dst="$2"
    VM_HAVE[$dst]=1
    vm_stage_safe "$dst"
    mkdir -p "$VM_STAGE$(dirname "$dst")"
    ln -sfn "$target" "$VM_STAGE$dst"
}

vm_stage_libs() { # BINARY: stage every library ldd lists, at the path ldd prints
    local bin="$1" out line lib
    if ! out="$(ldd "$bin" 2>&1)"; then
        [[ "$out" == *"not a dynamic executable"* || "$out" == *"statically linked"* ]] && return 0
        vm_die "ldd $bin failed: $out"
    fi
    if grep -q "not found" <<<"$out"; then vm_die "ldd $bin: missing libraries:"$'\n'"$out"; fi
    while read -r line; do
        lib=""
        if [[ "$line" == *" => /"* ]]; then lib="${line#* => }"; lib="${lib%% (*}"
        elif [[ "$line" == /* ]]; then lib="${line%% (*}"
        fi
        [[ -n "$lib" ]] || continue
        [[ -n "${VM_HAVE[$lib]:-}" || -n "${VM_BASE[$lib]:-}" ]] && continue
        vm_stage_file "$lib" "$lib"
        VM_LIBDIRS[$(dirname "$lib")]=1
    done <<<"$out"
}

vm_stage_bin() { # SRC DST: stage an executable and its libraries
    local src="$1" dst="$2"
    [[ -e "$src" ]] || vm_die "no such binary: $src"
    src="$(realpath "$src")"
    vm_stage_file "$src" "$dst"
    chmod 0755 "$VM_STAGE$dst"
    vm_stage_libs "$src"
}

# vm_bin_spec SPEC -> "SRC DST": SRC[:DST], DST defaulting to /usr/local/bin/NAME
vm_bin_dst() {
    local spec="$1"
    if [[ "$spec" == *:/* ]]; then echo "${spec#*:}"; else echo "/usr/local/bin/$(basename "$spec")"; fi
}
vm_bin_src() { local spec="$1"; if [[ "$spec" == *:/* ]]; then echo "${spec%%:/*}"; else echo "$spec"; fi; }
