#!/usr/bin/env bash
# Builds the Debian package ublk-http_VERSION_ARCH.deb from this repository and
# prints its path (the only line on standard output; the rest goes to stderr).
#
#   scripts/build-deb.sh [--out DIR] [--version VERSION] [--no-lintian]
#
#   --out DIR          where the .deb goes (default: .build-deb/ in the repository)
#   --version VERSION  the package's version (default: 0.1.0+gitYYYYMMDD.HASH, the
#                      date and short hash of HEAD's commit, in UTC; ".dirty" is
#                      added when what the package is built from differs from HEAD)
#   --no-lintian       do not run lintian on the result (it runs by default and
#                      only reports; tests/host/deb.sh fails on its errors)
#
# The binary is tests/build-static.sh's (release, Swift runtime linked
# statically), stripped. The man page is swift-argument-parser's generate-manual
# tool (the tool behind its `generate-manual` plugin) run on that binary, and the
# shell completions are the binary's own --generate-completion-script. The
# package's control files are in dist/debian/; dpkg-shlibdeps derives Depends:.
# Run as root (it installs what it lacks with apt-get); no fakeroot is needed:
# dpkg-deb --root-owner-group makes every file root's. Maintainer: DEBFULLNAME
# and DEBEMAIL, else the author of HEAD's commit. SOURCE_DATE_EPOCH (default:
# HEAD's commit time) dates the files, the man page and the changelog entry.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD

OUT=$REPO/.build-deb
VERSION=
LINTIAN=1
usage() {
    if [[ ${1:-2} == 0 ]]; then sed -n '2,13s/^# \{0,1\}//p' "$0"; else sed -n '2,13s/^# \{0,1\}//p' "$0" >&2; fi
    exit "${1:-2}"
}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT=${2:?--out needs a directory}; shift 2 ;;
        --out=*) OUT=${1#--out=}; shift ;;
        --version) VERSION=${2:?--version needs a value}; shift 2 ;;
        --version=*) VERSION=${1#--version=}; shift ;;
        --no-lintian) LINTIAN=0; shift ;;
        -h|--help) usage 0 ;;
        *) echo "build-deb.sh: unknown argument: $1" >&2; usage ;;
    esac
done
log() { echo "[build-deb] $*" >&2; }

# What building the package needs, from Debian's apt (deps.sh brings the rest:
# the Swift toolchain's path, liburing-dev, libcurl4-openssl-dev).
NEED=(dpkg-dev binutils gzip)
[[ $LINTIAN == 1 ]] && NEED+=(lintian)
missing=()
for p in "${NEED[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    [[ $(id -u) -eq 0 ]] || { echo "build-deb.sh: need root to install: ${missing[*]}" >&2; exit 1; }
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    while pgrep -x apt-get >/dev/null || pgrep -x dpkg >/dev/null; do sleep 3; done
    apt-get update -q >/tmp/ublk-http-apt-deb.log 2>&1 \
        && apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" >>/tmp/ublk-http-apt-deb.log 2>&1 \
        || { tail -n 40 /tmp/ublk-http-apt-deb.log >&2; echo "build-deb.sh: apt-get failed" >&2; exit 1; }
fi
source scripts/deps.sh

# Version, date, maintainer: from HEAD's commit, so that the same commit gives
# the same package.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
if [[ -z $VERSION ]]; then
    VERSION="0.1.0+git$(TZ=UTC date -d "@$SOURCE_DATE_EPOCH" +%Y%m%d).$(git rev-parse --short=7 HEAD)"
    # What goes into the package differs from HEAD (untracked files included).
    [[ -z $(git status --porcelain -- Package.swift Sources dist scripts tests/build-static.sh) ]] || VERSION+=".dirty"
fi
[[ $VERSION =~ ^[0-9][A-Za-z0-9.+~]*$ ]] || { echo "build-deb.sh: not a native Debian version: $VERSION" >&2; exit 1; }
if [[ -n ${DEBFULLNAME:-} && -n ${DEBEMAIL:-} ]]; then
    MAINTAINER="$DEBFULLNAME <$DEBEMAIL>"
else
    MAINTAINER=$(git log -1 --format='%an <%ae>')
fi
ARCH=$(dpkg --print-architecture)
log "ublk-http $VERSION ($ARCH), maintainer $MAINTAINER"

W=$(mktemp -d /tmp/ublk-http-deb.XXXXXX)
trap 'rm -rf "$W"' EXIT
umask 022
ROOT=$W/root
DOC=$ROOT/usr/share/doc/ublk-http

# The binary: the repository's own static build, stripped as dh_strip strips.
log "building the binary (tests/build-static.sh)"
BIN=$(tests/build-static.sh)
install -D -m 755 "$BIN" "$ROOT/usr/sbin/ublk-http"
strip --remove-section=.comment --remove-section=.note --strip-unneeded "$ROOT/usr/sbin/ublk-http"
UBLK=$ROOT/usr/sbin/ublk-http
"$UBLK" --help >/dev/null || { echo "build-deb.sh: the stripped binary does not run" >&2; exit 1; }

# systemd units and generator, the udev rule, the module to load at boot.
for u in ublk-http@.service ublk-http.target ublk-http-metrics.service ublk-http-metrics.timer; do
    install -D -m 644 "dist/systemd/$u" "$ROOT/usr/lib/systemd/system/$u"
done
install -D -m 755 dist/systemd/ublk-http-generator "$ROOT/usr/lib/systemd/system-generators/ublk-http-generator"
install -D -m 644 dist/udev/60-ublk-http.rules "$ROOT/usr/lib/udev/rules.d/60-ublk-http.rules"
install -D -m 644 dist/modules-load.conf "$ROOT/usr/lib/modules-load.d/ublk-http.conf"

# The device table: a conffile whose every line is a comment, and the example.
if grep -qv '^[[:space:]]*\(#.*\)\{0,1\}$' dist/ublktab.example; then
    echo "build-deb.sh: dist/ublktab.example declares a device: the conffile must only have comments" >&2; exit 1
fi
install -D -m 644 dist/ublktab.example "$ROOT/etc/ublk-http/ublktab"
install -D -m 644 dist/ublktab.example "$DOC/examples/ublktab"
install -D -m 644 dist/grafana/ublk-http.json "$DOC/examples/grafana-dashboard.json"

# The man page: swift-argument-parser's generate-manual, the tool its
# `generate-manual` plugin runs on each executable. The plugin itself first
# rebuilds the package in release mode without --static-swift-stdlib, in the
# scratch path it is given: in .build-static that relinks the binary above
# dynamically, elsewhere it is a second full release build. So the tool is
# built (debug, the dependency's product) and run on the binary shipped.
log "building swift-argument-parser's generate-manual"
swift build --scratch-path .build-static --product generate-manual >&2
GEN=$(swift build --scratch-path .build-static --product generate-manual --show-bin-path)/generate-manual
mkdir -p "$W/man"
"$GEN" "$UBLK" --section 8 --date "$(TZ=UTC date -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)" --output-directory "$W/man" >&2
[[ -s $W/man/ublk-http.8 ]] || { echo "build-deb.sh: generate-manual made no ublk-http.8" >&2; exit 1; }
install -d -m 755 "$ROOT/usr/share/man/man8"
# An empty line in mdoc is a warning (lintian's groff-message); .Pp is the
# paragraph break it stands for, and renders the same.
sed 's/^$/.Pp/' "$W/man/ublk-http.8" | gzip -9n >"$ROOT/usr/share/man/man8/ublk-http.8.gz"
chmod 644 "$ROOT/usr/share/man/man8/ublk-http.8.gz"

# Shell completions, from the binary itself.
install -d -m 755 "$ROOT/usr/share/bash-completion/completions" "$ROOT/usr/share/zsh/vendor-completions"
# bash-completion sources its files: no #! line (lintian's bash-completion-with-hashbang).
"$UBLK" --generate-completion-script bash | sed '1{/^#!/d}' >"$ROOT/usr/share/bash-completion/completions/ublk-http"
"$UBLK" --generate-completion-script zsh >"$ROOT/usr/share/zsh/vendor-completions/_ublk-http"
for f in "$ROOT/usr/share/bash-completion/completions/ublk-http" "$ROOT/usr/share/zsh/vendor-completions/_ublk-http"; do
    [[ -s $f ]] || { echo "build-deb.sh: empty completion script $f" >&2; exit 1; }
    chmod 644 "$f"
done

# debian/control and debian/changelog, for dpkg-shlibdeps and dpkg-gencontrol.
S=$W/src
mkdir -p "$S/debian"
sed "s|@MAINTAINER@|$MAINTAINER|" dist/debian/control >"$S/debian/control"
{
    echo "ublk-http ($VERSION) unstable; urgency=medium"
    echo
    echo "  * Built from commit $(git rev-parse --short=12 HEAD):"
    git log -1 --format=%s | fold -s -w 72 | sed 's/ *$//; s/^/    /'
    echo
    echo " -- $MAINTAINER  $(LC_ALL=C TZ=UTC date -R -d "@$SOURCE_DATE_EPOCH")"
} >"$S/debian/changelog"
sed "s|@MAINTAINER@|$MAINTAINER|" dist/debian/copyright >"$DOC/copyright"
chmod 644 "$DOC/copyright"
# A native package's changelog is changelog.gz (changelog.Debian.gz is for
# packages with a separate upstream).
gzip -9n <"$S/debian/changelog" >"$DOC/changelog.gz"
chmod 644 "$DOC/changelog.gz"

# Control area: maintainer scripts, conffiles, md5sums, control.
install -d -m 755 "$ROOT/DEBIAN"
install -m 755 dist/debian/postinst dist/debian/prerm dist/debian/postrm "$ROOT/DEBIAN/"
install -m 644 dist/debian/conffiles "$ROOT/DEBIAN/conffiles"
(cd "$S" && dpkg-shlibdeps -Tdebian/substvars "$ROOT/usr/sbin/ublk-http" >&2)
(cd "$S" && dpkg-gencontrol -publk-http -Tdebian/substvars -P"$ROOT" >&2)
(cd "$ROOT" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) >"$ROOT/DEBIAN/md5sums"
chmod 644 "$ROOT/DEBIAN/md5sums" "$ROOT/DEBIAN/control"
find "$ROOT" -depth -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

mkdir -p "$OUT"
DEB=$(realpath "$OUT")/ublk-http_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >&2
log "$(du -h "$DEB" | cut -f1) $DEB"

if [[ $LINTIAN == 1 ]]; then
    log "lintian:"
    lintian --display-info --pedantic "$DEB" >&2 || true
fi
echo "$DEB"
