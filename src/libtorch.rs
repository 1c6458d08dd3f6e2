//! Which libtorch this process loaded, and whether it is the release `tch` was built for.
//!
//! The binary links libtorch dynamically (rpath `$ORIGIN/../torch/lib`, then the building machine's,
//! or `LD_LIBRARY_PATH`). A libtorch of another release can load without a missing symbol and then
//! misbehave, so the binary reads the loaded library's version from the file the torch wheel keeps
//! beside it (`torch/version.py`; `build-version` in a libtorch zip) and refuses a mismatch.

use std::path::{Path, PathBuf};

/// The torch release tch 0.24.0 is built for; `scripts/setup.sh` installs the same wheel.
pub const EXPECTED_VERSION: &str = "2.11.0";

#[derive(Debug, thiserror::Error)]
#[error(
    "libtorch at {} is torch {found}, but this skytrain is built for torch {EXPECTED_VERSION}: install \
     torch=={EXPECTED_VERSION} (scripts/setup.sh) or point LD_LIBRARY_PATH at its torch/lib folder",
    dir.display()
)]
pub struct VersionMismatch {
    pub dir: PathBuf,
    pub found: String,
}

/// The folder of the `libtorch_cpu.so` mapped into this process, from `/proc/self/maps`.
pub fn loaded_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
        .and_then(|path| Path::new(path).parent().map(Path::to_path_buf))
}

/// The release recorded beside a `lib` folder: `../version.py` (`__version__ = '2.11.0+cu130'`) or
/// `../build-version` (`2.11.0+cpu`), without the local `+…` part.
pub fn version_beside(lib: &Path) -> Option<String> {
    let root = lib.parent()?;
    let raw = if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        text.lines()
            .find_map(|l| l.strip_prefix("__version__ = "))
            .map(|v| v.trim().trim_matches(|c| c == '\'' || c == '"').to_string())?
    } else {
        std::fs::read_to_string(root.join("build-version")).ok()?.trim().to_string()
    };
    Some(raw.split('+').next().unwrap_or(&raw).to_string())
}

/// Refuses a loaded libtorch whose recorded release differs from [`EXPECTED_VERSION`]. A libtorch
/// that records no version is accepted (nothing to compare).
pub fn check_loaded() -> Result<(), VersionMismatch> {
    let Some(dir) = loaded_dir() else { return Ok(()) };
    match version_beside(&dir) {
        Some(found) if found != EXPECTED_VERSION => Err(VersionMismatch { dir, found }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_wheel_and_the_zip_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("torch/lib");
        std::fs::create_dir_all(&lib).unwrap();
        assert_eq!(version_beside(&lib), None);
        std::fs::write(dir.path().join("torch/build-version"), "2.10.0+cpu\n").unwrap();
        assert_eq!(version_beside(&lib).as_deref(), Some("2.10.0"));
        std::fs::write(dir.path().join("torch/version.py"), "x = 1\n__version__ = '2.11.0+cu130'\n").unwrap();
        assert_eq!(version_beside(&lib).as_deref(), Some("2.11.0"));
    }

    #[test]
    fn this_process_loaded_the_expected_libtorch() {
        let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
        assert!(loaded_dir().is_some(), "libtorch_cpu.so not in /proc/self/maps");
        check_loaded().unwrap();
    }
}
