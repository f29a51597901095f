#!/usr/bin/env bash
# Installs what building Quiver needs and a fresh Debian machine lacks:
# libclang, which RocksDB's bindgen loads at build time. No protoc is needed
# (protox compiles the protos).
#
#   source scripts/ensure-deps.sh     find libclang, install libclang-dev if missing, and
#                                     export LIBCLANG_PATH if bindgen needs it to find it
#   scripts/ensure-deps.sh            the same, for a shell of its own (Makefile `deps`)
#   scripts/ensure-deps.sh --check    only report: print the library bindgen will load
#                                     (and LIBCLANG_PATH=dir if it needs that), exit 0;
#                                     or exit 1
#
# Detection follows the rules of clang-sys (what bindgen uses to load
# libclang), so "found" here means "bindgen will find it": the directory
# globs clang-sys searches, its file name patterns (libclang.so,
# libclang-N.so, libclang.so.N, libclang-N.so.N), never libclang-cpp (a
# different library the image ships), and a 64-bit ELF header. LIBCLANG_PATH,
# when set, is searched first, as clang-sys does. A libclang that only the
# dynamic linker knows of (`ldconfig -p`), outside those directories, is used
# by exporting LIBCLANG_PATH; that is decided the same way on every run, so
# bindgen (which rebuilds when LIBCLANG_PATH changes) sees the same value.
#
# Tests only: QUIVER_DEPS_ROOT prefixes every searched path, and
# QUIVER_DEPS_LDCONFIG names a file standing in for `ldconfig -p`'s output.

# When sourced, keep the caller's shell options; when run, be strict.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
fi

_quiver_root="${QUIVER_DEPS_ROOT:-}"

# clang-sys's DIRECTORIES_LINUX, in its order.
_quiver_search_dirs=(
    "/usr/local/llvm*/lib*"
    "/usr/local/lib*/*/*"
    "/usr/local/lib*/*"
    "/usr/local/lib*"
    "/usr/lib*/*/*"
    "/usr/lib*/*"
    "/usr/lib*"
)

# Whether a file is a 64-bit ELF shared object (what clang-sys checks).
_quiver_is_elf64() {
    [ -f "$1" ] || return 1
    [ "$(head -c 5 "$1" 2>/dev/null | od -An -tx1 | tr -d ' \n')" = "7f454c4602" ]
}

# Whether a file name is one clang-sys loads as libclang.
_quiver_is_libclang_name() {
    case "$1" in
        *-cpp.*) return 1 ;;
        libclang.so | libclang-*.so | libclang.so.* | libclang-*.so.*) return 0 ;;
        *) return 1 ;;
    esac
}

# Prints the first libclang in directory $1 that clang-sys would load.
_quiver_libclang_in_dir() {
    local dir="$1" file
    [ -d "$dir" ] || return 1
    for file in "$dir"/libclang.so "$dir"/libclang-*.so "$dir"/libclang.so.* "$dir"/libclang-*.so.*; do
        [ -e "$file" ] || continue
        _quiver_is_libclang_name "$(basename "$file")" || continue
        if _quiver_is_elf64 "$(readlink -f "$file")"; then
            echo "$file"
            return 0
        fi
    done
    return 1
}

# Prints the libclang bindgen will load without help, or fails.
_quiver_find_libclang() {
    local pattern dir
    if [ -n "${LIBCLANG_PATH:-}" ]; then
        _quiver_libclang_in_dir "$_quiver_root$LIBCLANG_PATH" && return 0
    fi
    for pattern in "${_quiver_search_dirs[@]}"; do
        # The glob is meant to expand here, as clang-sys expands it.
        # shellcheck disable=SC2206
        local dirs=($_quiver_root$pattern)
        for dir in "${dirs[@]}"; do
            _quiver_libclang_in_dir "$dir" && return 0
        done
    done
    return 1
}

# Prints the directory of a libclang the dynamic linker knows, or fails.
_quiver_ldconfig_libclang_dir() {
    local listing path
    if [ -n "${QUIVER_DEPS_LDCONFIG:-}" ]; then
        listing="$(cat "$QUIVER_DEPS_LDCONFIG")"
    else
        listing="$(ldconfig -p 2>/dev/null || true)"
    fi
    while read -r path; do
        [ -n "$path" ] || continue
        _quiver_is_libclang_name "$(basename "$path")" || continue
        if _quiver_is_elf64 "$(readlink -f "$_quiver_root$path")"; then
            dirname "$path"
            return 0
        fi
    done < <(printf '%s\n' "$listing" | sed -n 's/.*=> //p')
    return 1
}

# Finds libclang; exports LIBCLANG_PATH if only the dynamic linker knows it.
# Prints what it found.
_quiver_locate() {
    local found dir
    if found="$(_quiver_find_libclang)"; then
        echo "$found"
        return 0
    fi
    if dir="$(_quiver_ldconfig_libclang_dir)"; then
        export LIBCLANG_PATH="$dir"
        echo "LIBCLANG_PATH=$dir"
        return 0
    fi
    return 1
}

_quiver_ensure_deps() {
    if [ "${1:-}" = "--check" ]; then
        _quiver_locate
        return $?
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo not found: install the Rust toolchain (https://rustup.rs) first" >&2
        return 1
    fi
    local found sudo=""
    if found="$(_quiver_locate)"; then
        case "$found" in LIBCLANG_PATH=*) export "${found?}" ;; esac
        return 0
    fi
    echo "==> installing libclang-dev (RocksDB's bindings are generated with libclang)"
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq || return 1
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libclang-dev >/dev/null || return 1
    if ! found="$(_quiver_locate)"; then
        echo "libclang-dev is installed but no libclang that bindgen can load was found;" >&2
        echo "set LIBCLANG_PATH to the directory holding libclang.so" >&2
        return 1
    fi
    case "$found" in LIBCLANG_PATH=*) export "${found?}" ;; esac
    echo "==> bindgen will use ${found#LIBCLANG_PATH=}"
}

_quiver_ensure_deps "$@"
