//! Crash points for fault tests: `QUIVER_TEST_FAILPOINTS=name,name` makes
//! the process abort (no destructor runs, nothing is flushed: as `kill -9`
//! would leave it) when it reaches one of the named points. With
//! `QUIVER_TEST_FAILPOINTS_ONCE_DIR=<dir>`, each point fires once across
//! every process sharing the directory (the first to create `<dir>/<name>`
//! aborts), so a restarted node, or the next metadata leader, goes on.
//! Never set in production; unset, a point costs one read of a cached
//! value.

use std::path::PathBuf;
use std::sync::OnceLock;

/// The environment variable naming the armed points.
pub const FAILPOINTS_ENV: &str = "QUIVER_TEST_FAILPOINTS";
/// The environment variable naming the fire-once directory.
pub const FAILPOINTS_ONCE_DIR_ENV: &str = "QUIVER_TEST_FAILPOINTS_ONCE_DIR";

struct Armed {
    names: Vec<String>,
    once_dir: Option<PathBuf>,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let names: Vec<String> = std::env::var(FAILPOINTS_ENV)
                .ok()?
                .split(',')
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty())
                .collect();
            (!names.is_empty()).then(|| Armed {
                names,
                once_dir: std::env::var_os(FAILPOINTS_ONCE_DIR_ENV).map(PathBuf::from),
            })
        })
        .as_ref()
}

/// Aborts the process here if the point `name` is armed (see the module
/// doc).
pub fn failpoint(name: &str) {
    let Some(armed) = armed() else {
        return;
    };
    if !armed.names.iter().any(|armed| armed == name) {
        return;
    }
    if let Some(dir) = &armed.once_dir {
        let first = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(name))
            .is_ok();
        if !first {
            return;
        }
    }
    eprintln!("failpoint {name}: aborting");
    std::process::abort();
}
