# Sourced by scripts/fetch-linux and scripts/build-linux-module: apt with a private
# configuration, so that downloading Debian packages never uses or changes the host's apt state.
#
# private_apt_config DIR SUITE ARCH...  writes DIR/apt.conf (and its lists under DIR) for SUITE
#                                       main, from the machine's own mirror, for ARCH...
# apt_private DIR LOG COMMAND...         runs apt-get/apt-cache with that configuration, its
#                                       output in LOG; on failure calls `die` with apt's first
#                                       error line.
# The caller defines `die` and sources scripts/lib/debian-mirror.sh first.

private_apt_keyring=/usr/share/keyrings/debian-archive-keyring.gpg

private_apt_config() {
    local apt=$1 suite=$2 mirror arch archs=""
    shift 2
    mirror=$(debian_mirror)
    [ -n "$mirror" ] || die "no Debian mirror found in the machine's apt sources"
    [ -f "$private_apt_keyring" ] || die "$private_apt_keyring missing (package debian-archive-keyring)"
    mkdir -p "$apt"/etc/{apt.conf.d,sources.list.d,preferences.d,trusted.gpg.d} \
        "$apt"/state/lists/partial "$apt"/cache/archives/partial "$apt"/log
    : >"$apt/state/status"
    : >"$apt/etc/sources.list"
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
        "$mirror" "$suite" "$private_apt_keyring" >"$apt/etc/sources.list.d/debian.sources"
    for arch in "$@"; do archs+=" \"$arch\";"; done
    # Dir::Etc::Parts and Main point away from the host's files so its hooks and pinning do not
    # apply. The sandbox user is root because the download directory belongs to root.
    cat >"$apt/apt.conf" <<EOF
Dir::Etc "$apt/etc";
Dir::Etc::Parts "$apt/etc/apt.conf.d";
Dir::Etc::Main "/dev/null";
Dir::Etc::Trusted "$private_apt_keyring";
Dir::Etc::TrustedParts "$apt/etc/trusted.gpg.d";
Dir::State "$apt/state";
Dir::State::status "$apt/state/status";
Dir::Cache "$apt/cache";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Dir::Log "$apt/log";
APT::Architecture "$1";
APT::Architectures {$archs };
APT::Sandbox::User "root";
Acquire::Languages "none";
EOF
    # The machine's proxy settings, if any, describe its network rather than its packages: keep them.
    env -u APT_CONFIG apt-config dump | grep -E '^Acquire::[a-z]+::Proxy' >>"$apt/apt.conf" || true
}

apt_private() {
    local apt=$1 log=$2
    shift 2
    if ! APT_CONFIG=$apt/apt.conf "$@" >"$log" 2>&1; then
        die "$1 $2 failed: $(grep -m1 '^E: ' "$log" || tail -n1 "$log") (log: $log)"
    fi
}
