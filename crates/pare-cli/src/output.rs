//! Outputs that never destroy anything: every command that writes files (convert, prune,
//! init-random, finetune, train-scorer, eval compare and eval ruler --plot) goes through [`Output`].
//!
//! - an existing output (a file, or a non-empty directory) is refused unless `--force`;
//! - an output that is one of the inputs, or a directory holding one, is refused even with
//!   `--force` (paths compared canonicalized, so symlinks and `..` do not hide it);
//! - everything is written to a hidden sibling and renamed into place by [`Output::commit`],
//!   once the command has succeeded: an error or a panic on the way leaves nothing behind;
//! - files end up 0644 and directories 0755, whatever the writer created them with.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use pare_eval::plot::Format;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
}

/// One output path, checked, with its staging sibling.
#[derive(Debug)]
pub struct Output {
    target: PathBuf,
    staging: PathBuf,
    kind: Kind,
    committed: bool,
}

impl Output {
    /// An output directory named by `flag` (for messages), checked against `inputs`.
    pub fn dir(target: &Path, flag: &str, force: bool, inputs: &[&Path]) -> Result<Output> {
        Self::new(target, flag, force, inputs, Kind::Dir)
    }

    /// An output file named by `flag` (for messages), checked against `inputs`.
    pub fn file(target: &Path, flag: &str, force: bool, inputs: &[&Path]) -> Result<Output> {
        Self::new(target, flag, force, inputs, Kind::File)
    }

    fn new(target: &Path, flag: &str, force: bool, inputs: &[&Path], kind: Kind) -> Result<Output> {
        let shown = target.display();
        let name = target.file_name().with_context(|| format!("{flag} {shown}: not a file or directory name"))?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).with_context(|| format!("{flag} {shown}: cannot create {}", parent.display()))?;
        let resolved = canonical_target(target, &parent)?;
        let exists = fs::symlink_metadata(target).is_ok();
        for input in inputs {
            // An input that does not exist is reported by whoever reads it.
            let Ok(input_path) = input.canonicalize() else { continue };
            // The output is the input or holds it, or replaces a file inside an input directory.
            if input_path.starts_with(&resolved) || (exists && resolved.starts_with(&input_path)) {
                bail!("{flag} {shown} would overwrite the input {}", input.display());
            }
        }
        match fs::symlink_metadata(target) {
            Err(_) => {}
            Ok(meta) => {
                let exists_as = if meta.is_dir() { Kind::Dir } else { Kind::File };
                let empty_dir = exists_as == Kind::Dir && fs::read_dir(target).map(|mut d| d.next().is_none())?;
                if exists_as != kind {
                    let what = if exists_as == Kind::Dir { "a directory" } else { "a file" };
                    bail!("{flag} {shown} is {what}");
                }
                if !force && !empty_dir {
                    let what = if kind == Kind::Dir { "a non-empty directory" } else { "a file" };
                    bail!("{flag} {shown} already exists as {what}: pass --force to replace it");
                }
            }
        }
        let mut staging_name = std::ffi::OsString::from(".");
        staging_name.push(name);
        staging_name.push(format!(".pare-tmp-{}", std::process::id()));
        let staging = parent.join(staging_name);
        remove(&staging);
        // Created now, so that an unwritable place fails before any work.
        let created = match kind {
            Kind::Dir => fs::create_dir(&staging),
            Kind::File => fs::File::create(&staging).map(drop),
        };
        created.with_context(|| format!("{flag} {shown}: cannot write in {}", parent.display()))?;
        Ok(Output { target: target.to_path_buf(), staging, kind, committed: false })
    }

    /// Where the command writes now.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// The final path, for messages.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Move the finished output into place (replacing what `--force` allowed to replace).
    pub fn commit(mut self) -> Result<()> {
        set_modes(&self.staging).with_context(|| format!("cannot set permissions in {}", self.staging.display()))?;
        let shown = self.target.display();
        if self.kind == Kind::Dir && self.target.is_dir() {
            // rename(2) only replaces an empty directory: move the old one aside first.
            let mut old_name = self.staging.clone().into_os_string();
            old_name.push(".old");
            let old = PathBuf::from(old_name);
            fs::rename(&self.target, &old).with_context(|| format!("cannot replace {shown}"))?;
            if let Err(e) = fs::rename(&self.staging, &self.target) {
                let _ = fs::rename(&old, &self.target);
                return Err(e).with_context(|| format!("cannot move the output into {shown}"));
            }
            remove(&old);
        } else {
            fs::rename(&self.staging, &self.target).with_context(|| format!("cannot move the output into {shown}"))?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if !self.committed {
            remove(&self.staging);
        }
    }
}

/// The format (SVG or PNG) a plot's file name asks for, as a one-line error naming `flag`:
/// called before any work, since the plot is drawn last.
pub fn plot_format(target: &Path, flag: &str) -> Result<Format> {
    Format::from_path(target).map_err(|e| anyhow!("{flag} {e}"))
}

/// The path `target` will have: its parent canonicalized (the target itself may not exist yet,
/// or may be a symlink, which is then followed).
fn canonical_target(target: &Path, parent: &Path) -> Result<PathBuf> {
    if let Ok(p) = target.canonicalize() {
        return Ok(p);
    }
    let parent = parent.canonicalize().with_context(|| format!("cannot resolve {}", parent.display()))?;
    Ok(parent.join(target.file_name().expect("checked by the caller")))
}

fn remove(path: &Path) {
    let _ = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => Ok(()),
    };
}

/// Plain modes, 0644 files and 0755 directories (temporary-file writers create 0600).
fn set_modes(path: &Path) -> std::io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
        for entry in fs::read_dir(path)? {
            set_modes(&entry?.path())?;
        }
        Ok(())
    } else if meta.is_file() {
        fs::set_permissions(path, fs::Permissions::from_mode(0o644))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pare-output-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_uncommitted_output_leaves_nothing() {
        let dir = scratch("uncommitted");
        let out = Output::dir(&dir.join("model"), "--out", false, &[]).unwrap();
        fs::write(out.path().join("weights"), b"half").unwrap();
        drop(out);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    }

    #[test]
    fn existing_outputs_need_force_and_inputs_are_never_outputs() {
        let dir = scratch("existing");
        let model = dir.join("model");
        fs::create_dir_all(&model).unwrap();
        fs::write(model.join("config.json"), b"{}").unwrap();
        let err = Output::dir(&model, "--out", false, &[]).unwrap_err().to_string();
        assert!(err.contains("--force"), "{err}");
        let err = Output::dir(&model, "--out", true, &[&model.join("config.json")]).unwrap_err().to_string();
        assert!(err.contains("would overwrite the input"), "{err}");
        let link = dir.join("link.txt");
        std::os::unix::fs::symlink(model.join("config.json"), &link).unwrap();
        let err = Output::file(&link, "--plot", true, &[&model.join("config.json")]).unwrap_err().to_string();
        assert!(err.contains("would overwrite the input"), "{err}");

        let out = Output::dir(&model, "--out", true, &[]).unwrap();
        fs::write(out.path().join("new"), b"x").unwrap();
        out.commit().unwrap();
        let names: Vec<_> = fs::read_dir(&model).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["new"]);
        let mode = fs::metadata(model.join("new")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 2, "no staging left next to the output");
    }
}
