#!/usr/bin/env bash
# Print the Debian mirror this machine's apt uses for a suite: the URI of the first enabled `deb`
# source that lists the suite, read from sources.list, sources.list.d/*.list (one-line form) and
# sources.list.d/*.sources (deb822 form). Prints nothing and exits 1 when there is none.
#
#   apt-mirror.sh [SUITE]        (default bookworm; APT_ETC overrides /etc/apt, for tests)
set -euo pipefail
suite=${1:-bookworm}
etc=${APT_ETC:-/etc/apt}

one_line() {  # deb [options] URI SUITE COMPONENTS...
    awk -v s="$suite" '
        $1 == "deb" {
            i = 2
            if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
            if ($(i + 1) == s) { print $i; exit }
        }' "$1"
}

deb822() {  # stanzas of Key: value lines, separated by blank lines
    awk -v s="$suite" '
        function value(line) { sub(/^[^:]*:[ \t]*/, "", line); return line }
        function flush(   u) {
            if (!done && types ~ /(^|[ \t])deb([ \t]|$)/ && tolower(enabled) != "no" \
                && (" " suites " ") ~ ("[ \t]" s "[ \t]")) {
                split(uris, u, /[ \t]+/); print u[1]; done = 1
            }
            types = uris = suites = enabled = ""
        }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        tolower($1) == "types:"   { types = value($0) }
        tolower($1) == "uris:"    { uris = value($0) }
        tolower($1) == "suites:"  { suites = value($0) }
        tolower($1) == "enabled:" { enabled = value($0) }
        END { flush() }' "$1"
}

found=$(
    for f in "$etc/sources.list" "$etc"/sources.list.d/*.list; do
        if [ -f "$f" ]; then one_line "$f"; fi
    done
    for f in "$etc"/sources.list.d/*.sources; do
        if [ -f "$f" ]; then deb822 "$f"; fi
    done
)
mirror=$(printf '%s\n' "$found" | sed -n '/./{s:/*$::;p;q;}')
[ -n "$mirror" ] || exit 1
printf '%s\n' "$mirror"
