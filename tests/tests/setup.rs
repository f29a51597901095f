//! The setup script's libclang detection (`scripts/ensure-deps.sh --check`),
//! run against fake library trees: it must accept exactly what bindgen
//! (clang-sys) will load, and never `libclang-cpp`, which the image ships
//! and which is a different library.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The first bytes of a 64-bit little-endian ELF file: what clang-sys checks.
const ELF64: &[u8] = b"\x7fELF\x02\x01\x01\x00";
/// The first bytes of a 32-bit ELF file.
const ELF32: &[u8] = b"\x7fELF\x01\x01\x01\x00";

fn script() -> PathBuf {
    quiver_tests::workspace_path("scripts/ensure-deps.sh")
}

/// Writes `bytes` at `root/relative`, creating directories.
fn put(root: &Path, relative: &str, bytes: &[u8]) {
    let path = root.join(relative.trim_start_matches('/'));
    std::fs::create_dir_all(path.parent().expect("a file path has a parent")).expect("mkdir");
    std::fs::write(&path, bytes).expect("write fake library");
}

/// Runs the check against the fake tree; the library found (its path
/// inside the tree), `LIBCLANG_PATH=dir` when bindgen needs that, or None.
fn check(root: &Path, libclang_path: Option<&str>) -> Option<String> {
    check_with_ldconfig(root, libclang_path, "")
}

/// [`check`] with `ldconfig -p` answering `ldconfig`.
fn check_with_ldconfig(root: &Path, libclang_path: Option<&str>, ldconfig: &str) -> Option<String> {
    let listing = root.join("ldconfig.txt");
    std::fs::write(&listing, ldconfig).expect("write the fake ldconfig listing");
    let mut command = Command::new("bash");
    command
        .arg(script())
        .arg("--check")
        .env("QUIVER_DEPS_ROOT", root)
        .env("QUIVER_DEPS_LDCONFIG", &listing)
        .env_remove("LIBCLANG_PATH");
    if let Some(path) = libclang_path {
        command.env("LIBCLANG_PATH", path);
    }
    let output = command.output().expect("run ensure-deps.sh");
    match output.status.code() {
        Some(0) => {
            let found = String::from_utf8(output.stdout).expect("utf-8 path");
            let found = found.trim();
            if found.starts_with("LIBCLANG_PATH=") {
                return Some(found.to_owned());
            }
            let relative = found
                .strip_prefix(root.to_str().expect("utf-8 temp dir"))
                .unwrap_or_else(|| panic!("{found} is outside the fake tree"));
            Some(relative.to_owned())
        }
        Some(1) => None,
        other => panic!(
            "ensure-deps.sh --check exited {other:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

fn tree() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

#[test]
fn libclang_cpp_alone_is_not_libclang() {
    // The image as shipped: libclang-cpp14, in both places Debian puts it.
    let root = tree();
    put(
        root.path(),
        "/usr/lib/llvm-14/lib/libclang-cpp.so.14",
        ELF64,
    );
    put(
        root.path(),
        "/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14",
        ELF64,
    );
    put(root.path(), "/usr/lib/llvm-14/lib/libLLVM-14.so", ELF64);
    assert_eq!(check(root.path(), None), None);
}

#[test]
fn debian_libclang_is_found_where_the_packages_put_it() {
    // libclang1-14 alone (no -dev): only the versioned names.
    let root = tree();
    put(
        root.path(),
        "/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14",
        ELF64,
    );
    put(
        root.path(),
        "/usr/lib/x86_64-linux-gnu/libclang-14.so.1",
        ELF64,
    );
    assert_eq!(
        check(root.path(), None).as_deref(),
        Some("/usr/lib/x86_64-linux-gnu/libclang-14.so.1")
    );

    // libclang-14-dev: the unversioned name in LLVM's own directory.
    let root = tree();
    put(
        root.path(),
        "/usr/lib/llvm-14/lib/libclang-cpp.so.14",
        ELF64,
    );
    put(root.path(), "/usr/lib/llvm-14/lib/libclang.so.1", ELF64);
    assert_eq!(
        check(root.path(), None).as_deref(),
        Some("/usr/lib/llvm-14/lib/libclang.so.1")
    );
}

#[test]
fn a_symlink_is_judged_by_its_target() {
    let root = tree();
    put(root.path(), "/usr/lib/llvm-16/lib/libclang-16.so.16", ELF64);
    std::os::unix::fs::symlink(
        "libclang-16.so.16",
        root.path().join("usr/lib/llvm-16/lib/libclang.so"),
    )
    .expect("symlink");
    assert_eq!(
        check(root.path(), None).as_deref(),
        Some("/usr/lib/llvm-16/lib/libclang.so")
    );

    // A dangling link is no library.
    let root = tree();
    std::fs::create_dir_all(root.path().join("usr/lib/llvm-16/lib")).expect("mkdir");
    std::os::unix::fs::symlink(
        "gone.so",
        root.path().join("usr/lib/llvm-16/lib/libclang.so"),
    )
    .expect("symlink");
    assert_eq!(check(root.path(), None), None);
}

#[test]
fn files_that_are_not_64_bit_libraries_are_refused() {
    let root = tree();
    // A linker script or stub named like the library, and a 32-bit build.
    put(
        root.path(),
        "/usr/lib/llvm-14/lib/libclang.so",
        b"INPUT(libclang.so.1)\n",
    );
    put(
        root.path(),
        "/usr/lib/i386-linux-gnu/libclang-14.so.1",
        ELF32,
    );
    assert_eq!(check(root.path(), None), None);
}

#[test]
fn names_clang_sys_does_not_load_are_ignored() {
    let root = tree();
    put(root.path(), "/usr/lib/llvm-14/lib/libclangBasic.a", ELF64);
    put(root.path(), "/usr/lib/llvm-14/lib/libclang.a", ELF64);
    put(
        root.path(),
        "/usr/lib/llvm-14/lib/libclang_rt.asan.so",
        ELF64,
    );
    assert_eq!(check(root.path(), None), None);
}

#[test]
fn libclang_path_is_searched_first_and_may_be_anywhere() {
    let root = tree();
    put(root.path(), "/opt/llvm/lib/libclang.so", ELF64);
    put(root.path(), "/usr/lib/llvm-14/lib/libclang.so.1", ELF64);
    assert_eq!(
        check(root.path(), Some("/opt/llvm/lib")).as_deref(),
        Some("/opt/llvm/lib/libclang.so")
    );
    // Outside the standard directories and not named: not found.
    let root = tree();
    put(root.path(), "/opt/llvm/lib/libclang.so", ELF64);
    assert_eq!(check(root.path(), None), None);
}

#[test]
fn a_libclang_only_the_dynamic_linker_knows_is_used_through_libclang_path() {
    let root = tree();
    put(root.path(), "/opt/llvm-17/lib/libclang.so.17", ELF64);
    put(root.path(), "/opt/llvm-17/lib/libclang-cpp.so.17", ELF64);
    let ldconfig = "\t3 libs found in cache `/etc/ld.so.cache'\n\
        \tlibclang-cpp.so.17 (libc6,x86-64) => /opt/llvm-17/lib/libclang-cpp.so.17\n\
        \tlibclang.so.17 (libc6,x86-64) => /opt/llvm-17/lib/libclang.so.17\n\
        \tlibc.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libc.so.6\n";
    assert_eq!(
        check_with_ldconfig(root.path(), None, ldconfig).as_deref(),
        Some("LIBCLANG_PATH=/opt/llvm-17/lib")
    );
    // The linker knowing only libclang-cpp is still no libclang.
    let root = tree();
    put(root.path(), "/opt/llvm-17/lib/libclang-cpp.so.17", ELF64);
    let ldconfig = "\tlibclang-cpp.so.17 (libc6,x86-64) => /opt/llvm-17/lib/libclang-cpp.so.17\n";
    assert_eq!(check_with_ldconfig(root.path(), None, ldconfig), None);
}
