#!/usr/bin/env bash
# Host test of the Debian package: builds it with scripts/build-deb.sh (or takes
# one with --deb FILE) and checks what it holds, with dpkg-deb alone (nothing is
# installed): every file in its place with its mode, the conffile, the maintainer
# scripts, Depends:, the man page (add, up, serve), the completions, and that
# lintian reports no error (E:).
# Usage: tests/host/deb.sh [--deb FILE]
source "$(dirname "${BASH_SOURCE[0]}")/../vm/lib.sh"
REPO=$(realpath "$(dirname "${BASH_SOURCE[0]}")/../..")
DEB=
case "${1:-}" in
    --deb) DEB=$(realpath "${2:?--deb needs a file}") ;;
    "") ;;
    *) echo "usage: tests/host/deb.sh [--deb FILE]" >&2; exit 2 ;;
esac
W=$(mktemp -d /tmp/ublk-http-deb-test.XXXXXX)
trap 'rm -rf "$W"' EXIT

section "the package"
if [[ -z $DEB ]]; then
    S=$(date +%s)
    if DEB=$("$REPO/scripts/build-deb.sh" --out "$W/out" --no-lintian 2>"$W/build.log"); then
        ok "scripts/build-deb.sh builds it in $(( $(date +%s) - S )) s: $(basename "$DEB")"
    else
        fail "scripts/build-deb.sh builds it" "$(tail -n 20 "$W/build.log")"
        finish; exit 1
    fi
fi
check "$(basename "$DEB") is a .deb" dpkg-deb --info "$DEB"
check "its name is ublk-http_VERSION_amd64.deb" bash -c "[[ '$(basename "$DEB")' =~ ^ublk-http_[0-9][A-Za-z0-9.+~]*_amd64\.deb$ ]]"
field() { dpkg-deb --field "$DEB" "$1"; }
eq "Package" ublk-http "$(field Package)"
eq "Architecture" amd64 "$(field Architecture)"
eq "the version in the file name" "$(basename "$DEB" | cut -d_ -f2)" "$(field Version)"
eq "Section" admin "$(field Section)"
DEPENDS=$(field Depends)
for lib in liburing2 libcurl4 libssl3 libc6; do
    check "Depends on $lib" bash -c "grep -qw '$lib' <<<'$DEPENDS'"
done
check "no dependency on a Swift runtime package" bash -c "! grep -qi swift <<<'$DEPENDS'"

section "files and modes (dpkg-deb -c)"
dpkg-deb -c "$DEB" >"$W/list"
# mode PATH: the permissions and owner dpkg-deb lists, "-rw-r--r-- root/root".
mode() { awk -v p="./$1" '$6 == p { print $1, $2 }' "$W/list"; }
while read -r perm path; do
    eq "$path" "$perm root/root" "$(mode "$path")"
done <<'FILES'
-rwxr-xr-x usr/sbin/ublk-http
-rw-r--r-- usr/lib/systemd/system/ublk-http@.service
-rw-r--r-- usr/lib/systemd/system/ublk-http.target
-rw-r--r-- usr/lib/systemd/system/ublk-http-metrics.service
-rw-r--r-- usr/lib/systemd/system/ublk-http-metrics.timer
-rwxr-xr-x usr/lib/systemd/system-generators/ublk-http-generator
-rw-r--r-- usr/lib/udev/rules.d/60-ublk-http.rules
-rw-r--r-- usr/lib/modules-load.d/ublk-http.conf
-rw-r--r-- etc/ublk-http/ublktab
-rw-r--r-- usr/share/doc/ublk-http/examples/ublktab
-rw-r--r-- usr/share/doc/ublk-http/copyright
-rw-r--r-- usr/share/doc/ublk-http/changelog.gz
-rw-r--r-- usr/share/man/man8/ublk-http.8.gz
-rw-r--r-- usr/share/bash-completion/completions/ublk-http
-rw-r--r-- usr/share/zsh/vendor-completions/_ublk-http
FILES
check "every entry is root's" bash -c "awk '\$2 != \"root/root\"' '$W/list' | grep -c . | grep -qx 0"
check "nothing under /usr/local, /lib or /sbin (merged-usr paths only)" bash -c "! awk '{print \$6}' '$W/list' | grep -qE '^\./(usr/local|lib|sbin|bin)/'"

dpkg-deb -x "$DEB" "$W/x"
X=$W/x
for f in ublk-http@.service ublk-http.target ublk-http-metrics.service ublk-http-metrics.timer; do
    check "$f is dist/systemd's" cmp "$X/usr/lib/systemd/system/$f" "$REPO/dist/systemd/$f"
done
check "the generator is dist/systemd's" cmp "$X/usr/lib/systemd/system-generators/ublk-http-generator" "$REPO/dist/systemd/ublk-http-generator"
check "the udev rule is dist/udev's" cmp "$X/usr/lib/udev/rules.d/60-ublk-http.rules" "$REPO/dist/udev/60-ublk-http.rules"
check "modules-load.d names ublk_drv" grep -qx ublk_drv "$X/usr/lib/modules-load.d/ublk-http.conf"
check "the units run /usr/sbin/ublk-http" grep -q "ExecStart=/usr/sbin/ublk-http serve" "$X/usr/lib/systemd/system/ublk-http@.service"

section "the binary"
B=$X/usr/sbin/ublk-http
check "it runs (--help)" "$B" --help
check "it is stripped (no .symtab)" bash -c "! readelf -S '$B' | grep -q '\.symtab'"
check "the Swift runtime is linked in (no libswift*.so needed)" bash -c "! readelf -d '$B' | grep -qi 'swift'"
for lib in liburing.so.2 libcurl.so.4 libcrypto.so.3; do
    check "it needs $lib (declared by Depends)" bash -c "readelf -d '$B' | grep -q 'NEEDED.*\[$lib\]'"
done

section "the device table"
check "/etc/ublk-http/ublktab is a conffile" bash -c "dpkg-deb --ctrl-tarfile '$DEB' | tar -xO ./conffiles | grep -qx /etc/ublk-http/ublktab"
check "every line of the conffile is a comment" bash -c "! grep -qv '^[[:space:]]*\(#.*\)\{0,1\}\$' '$X/etc/ublk-http/ublktab'"
check "the example is dist/ublktab.example" cmp "$X/usr/share/doc/ublk-http/examples/ublktab" "$REPO/dist/ublktab.example"

section "maintainer scripts"
dpkg-deb --ctrl-tarfile "$DEB" | tar -tvf - >"$W/ctrl"
for s in postinst prerm postrm; do
    eq "$s is 0755" "-rwxr-xr-x root/root" "$(awk -v p="./$s" '$6 == p { print $1, $2 }' "$W/ctrl")"
    check "$s parses (sh -n)" bash -c "dpkg-deb --ctrl-tarfile '$DEB' | tar -xO ./$s | sh -n"
done
check "md5sums lists the files" bash -c "dpkg-deb --ctrl-tarfile '$DEB' | tar -xO ./md5sums | grep -q ' usr/sbin/ublk-http\$'"
check "postinst enables ublk-http.target and ublk-http-metrics.timer" bash -c "dpkg-deb --ctrl-tarfile '$DEB' | tar -xO ./postinst | grep -q 'UNITS=\"ublk-http.target ublk-http-metrics.timer\"'"
check "postinst loads ublk_drv and reloads udev" bash -c "dpkg-deb --ctrl-tarfile '$DEB' | tar -xO ./postinst | grep -q 'modprobe ublk_drv' && dpkg-deb --ctrl-tarfile '$DEB' | tar -xO ./postinst | grep -q 'udevadm control --reload'"
check "postrm purge keeps /var/lib/ublk-http" bash -c "! dpkg-deb --ctrl-tarfile '$DEB' | tar -xO ./postrm | grep -q 'rm -rf /var/lib'"

section "man page and completions"
MAN=$X/usr/share/man/man8/ublk-http.8.gz
check "ublk-http.8.gz is gzip" gzip -t "$MAN"
check "it is section 8" bash -c "zcat '$MAN' | grep -q '^\.Dt UBLK-HTTP 8'"
for sub in add up serve down check del list; do
    check "it documents \`$sub\`" bash -c "zcat '$MAN' | grep -qx '\.It Em $sub'"
done
if command -v man >/dev/null; then
    check "man renders it without a warning" bash -c "[ -z \"\$(LC_ALL=C.UTF-8 man --warnings -E UTF-8 -l -Tutf8 -Z '$MAN' 2>&1 >/dev/null)\" ]"
fi
BASHC=$X/usr/share/bash-completion/completions/ublk-http
ZSHC=$X/usr/share/zsh/vendor-completions/_ublk-http
check "the bash completion is not empty" test -s "$BASHC"
check "the zsh completion is not empty" test -s "$ZSHC"
check "the bash completion parses and defines its function" bash -c "source '$BASHC' && complete -p ublk-http"
check "the zsh completion is #compdef ublk-http" bash -c "head -n 1 '$ZSHC' | grep -q '^#compdef ublk-http'"
check "the completions know the subcommands" bash -c "grep -qw serve '$BASHC' && grep -qw serve '$ZSHC'"

section "docs"
check "copyright is machine-readable (DEP-5)" bash -c "head -n 1 '$X/usr/share/doc/ublk-http/copyright' | grep -q '^Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/'"
check "changelog.gz names the version" bash -c "zcat '$X/usr/share/doc/ublk-http/changelog.gz' | head -n 1 | grep -qF 'ublk-http ($(field Version))'"

section "lintian"
command -v lintian >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends lintian >/dev/null 2>&1 || true; }
if command -v lintian >/dev/null; then
    rc=0; lintian --display-info --pedantic "$DEB" >"$W/lintian" 2>"$W/lintian.err" || rc=$?
    grep -E '^[EWIPX]: ' "$W/lintian" | sed 's/^/    /'
    # lintian exits 1 on its own failure, 2 on an error tag (--fail-on error, its default).
    check "lintian ran (exit $rc)" bash -c "[ $rc -ne 1 ] || { cat '$W/lintian.err'; false; }"
    check "lintian: no error (E:)" bash -c "[ $rc -eq 0 ] && ! grep -q '^E: ' '$W/lintian'"
    echo "    lintian: $(grep -c '^W: ' "$W/lintian") warning(s), $(grep -c '^I: ' "$W/lintian") info tag(s)"
else
    fail "lintian is installed" "apt-get install lintian"
fi

finish
