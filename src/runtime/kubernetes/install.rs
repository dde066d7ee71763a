//! `arl install-agent DEST`: what a sandbox pod's init container runs — copies this static
//! binary into the pod's shared emptyDir so that the user's image can run it as its agent.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Copies the running binary to `dest` (written beside it, then renamed: a container never
/// sees half a binary). Returns the exit code.
pub fn main(dest: &Path) -> i32 {
    match install(dest) {
        Ok(bytes) => {
            println!("installed the agent at {} ({bytes} bytes)", dest.display());
            0
        }
        Err(e) => {
            eprintln!("arl install-agent: {}: {e}", dest.display());
            1
        }
    }
}

fn install(dest: &Path) -> io::Result<u64> {
    let name = dest
        .file_name()
        .ok_or_else(|| io::Error::other("the destination names no file"))?;
    let mut partial = name.to_os_string();
    partial.push(".partial");
    let tmp = dest.with_file_name(partial);
    let bytes = fs::copy("/proc/self/exe", &tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    fs::rename(&tmp, dest)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn copies_itself_executable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("arl-install-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let dest = dir.join("arl");
        assert_eq!(super::main(&dest), 0);
        let meta = std::fs::metadata(&dest).expect("installed");
        assert_eq!(meta.permissions().mode() & 0o777, 0o755);
        let own = std::fs::metadata("/proc/self/exe").expect("self");
        assert_eq!(meta.len(), own.len());
        assert_eq!(
            super::main(&dir.join("missing/arl")),
            1,
            "a bad destination fails"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
