# Sourced by scripts/setup and scripts/fetch-linux; defines debian_mirror.
#
# debian_mirror prints the URI of the Debian archive this machine's apt already uses, so that no
# mirror host name is ever written into the repository. It reads the deb822 files
# (/etc/apt/sources.list.d/*.sources, URIs: field) and falls back to the one-line format
# (/etc/apt/sources.list). Security archives are skipped: they do not carry the main suites.
# Prints nothing if no mirror is found.

debian_mirror() {
    local uri="" sources=() saved_nullglob
    saved_nullglob=$(shopt -p nullglob || true)
    shopt -s nullglob
    sources=(/etc/apt/sources.list.d/*.sources)
    eval "$saved_nullglob"

    if [ "${#sources[@]}" -gt 0 ]; then
        # One stanza per paragraph; field names are case-insensitive. The first URI of the first
        # enabled "deb" stanza that is not a security one wins.
        uri=$(awk '
            function finish() {
                if (!found && uri != "" && types ~ / deb / && enabled != "no" \
                        && uri !~ /security/ && suites !~ /-security/) {
                    print uri
                    found = 1
                }
                uri = ""; types = " "; suites = ""; enabled = ""
            }
            BEGIN { types = " " }
            FNR == 1 { finish() }
            /^[ \t]*$/ { finish(); next }
            /^#/ { next }
            {
                field = tolower($1)
                if (field == "uris:") uri = $2
                else if (field == "types:") { $1 = ""; types = $0 " " }
                else if (field == "suites:") { $1 = ""; suites = $0 }
                else if (field == "enabled:") enabled = tolower($2)
            }
            END { finish() }
        ' "${sources[@]}")
    fi

    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        # "deb [options] URI suite components...": skip the bracketed options, which may hold spaces.
        uri=$(awk '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($i !~ /security/ && $(i + 1) !~ /-security/) { print $i; exit }
            }
        ' /etc/apt/sources.list)
    fi

    echo "$uri"
}
