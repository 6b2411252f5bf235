#!/bin/sh
# Install FlowForge.  Readable POSIX sh; safe to run twice.
#
#   ./install.sh --prefix DIR   put a `flowforge` command in DIR/bin (module in DIR/lib/flowforge)
#   ./install.sh --repo PATH    vendor flowforge.py (and plugins) into a git repository
#                               and run `flowforge init` there
#
# The command imports the installed module instead of executing the file, so
# Python reuses the compiled bytecode, and it runs Python with -S because
# FlowForge needs nothing from site-packages (whose .pth files can cost more
# start-up time than FlowForge itself).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}

usage() {
    echo "usage: $0 --prefix DIR | --repo PATH" >&2
    exit 64
}

[ $# -eq 2 ] || usage
mode=$1
target=$2
[ -f "$here/flowforge.py" ] || { echo "install.sh: $here/flowforge.py is missing" >&2; exit 66; }

# The real interpreter (not a version-manager shim), for the launcher's #! line.
real_python=$("$python" -c 'import sys; print(sys.executable)') || {
    echo "install.sh: cannot run $python" >&2; exit 69; }

case $mode in
--prefix)
    lib="$target/lib/flowforge"
    mkdir -p "$target/bin" "$lib/plugins"
    cp "$here/flowforge.py" "$lib/flowforge.py.new" && mv "$lib/flowforge.py.new" "$lib/flowforge.py"
    for plugin in "$here"/plugins/*.py; do
        [ -f "$plugin" ] && cp "$plugin" "$lib/plugins/"
    done
    "$real_python" -m compileall -q "$lib" >/dev/null
    launcher="$target/bin/flowforge"
    # The launcher and its fast start for the timer commands (flowforge.py,
    # section 16); -X no_debug_ranges leaves column tables out of that cache.
    "$real_python" -S -X no_debug_ranges -c 'import sys; sys.path.insert(0, sys.argv[1]); import flowforge; flowforge.write_launcher(sys.argv[2])' "$lib" "$launcher.new"
    chmod 755 "$launcher.new"
    mv "$launcher.new" "$launcher"
    echo "installed $launcher"
    case ":$PATH:" in
    *":$target/bin:"*) ;;
    *) echo "note: $target/bin is not on your PATH" ;;
    esac
    ;;
--repo)
    top=$(git -C "$target" rev-parse --show-toplevel 2>/dev/null) || {
        echo "install.sh: $target is not inside a git work tree" >&2; exit 1; }
    if [ "$top/flowforge.py" != "$here/flowforge.py" ]; then
        cp "$here/flowforge.py" "$top/flowforge.py.new" && mv "$top/flowforge.py.new" "$top/flowforge.py"
    fi
    mkdir -p "$top/.flowforge/plugins"
    for plugin in "$here"/plugins/*.py; do
        [ -f "$plugin" ] && cp "$plugin" "$top/.flowforge/plugins/"
    done
    "$real_python" "$top/flowforge.py" -C "$top" init
    echo "vendored FlowForge into $top: commit flowforge.py and .flowforge/"
    ;;
*)
    usage
    ;;
esac
