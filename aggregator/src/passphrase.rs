//! Where a person's passphrase comes from: a file named on the command line, the
//! `RENKEI_PASSPHRASE` environment variable (for scripts), or a prompt on the terminal (no
//! echo). Shared by the researcher's and the admins' command lines.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// The environment variable scripts may use to pass a passphrase.
pub const PASSPHRASE_ENV: &str = "RENKEI_PASSPHRASE";

/// Where to get a passphrase.
#[derive(Debug, Clone, Default)]
pub struct PassphraseSource {
    /// Read the first line of this file.
    pub file: Option<PathBuf>,
}

impl PassphraseSource {
    pub fn from_file(file: Option<PathBuf>) -> Self {
        Self { file }
    }

    /// The passphrase to unlock `key`.
    pub fn unlock(&self, key: &Path) -> Result<Zeroizing<String>, String> {
        self.get(&format!("passphrase for {}: ", key.display()), false)
    }

    /// A new passphrase (asked twice on a terminal).
    pub fn new_passphrase(&self) -> Result<Zeroizing<String>, String> {
        self.get("new passphrase: ", true)
    }

    fn get(&self, prompt: &str, confirm: bool) -> Result<Zeroizing<String>, String> {
        if let Some(path) = &self.file {
            let text = Zeroizing::new(
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
            );
            let line = text.lines().next().unwrap_or_default();
            return non_empty(Zeroizing::new(line.to_string()));
        }
        if let Ok(value) = std::env::var(PASSPHRASE_ENV) {
            return non_empty(Zeroizing::new(value));
        }
        let first = Zeroizing::new(rpassword::prompt_password(prompt).map_err(|e| {
            format!("cannot prompt for it ({e}); use --passphrase-file or ${PASSPHRASE_ENV}")
        })?);
        if confirm {
            let again = Zeroizing::new(
                rpassword::prompt_password("repeat it: ").map_err(|e| e.to_string())?,
            );
            if *first != *again {
                return Err("the two passphrases differ".into());
            }
        }
        non_empty(first)
    }
}

fn non_empty(passphrase: Zeroizing<String>) -> Result<Zeroizing<String>, String> {
    if passphrase.is_empty() {
        Err("the passphrase is empty".into())
    } else {
        Ok(passphrase)
    }
}
