//! Why a build failed, in a class the farm can act on ([`Failure`]): `image` (mic or the
//! kickstart failed: the same input fails again), `infrastructure` (timeout, stall, guest boot,
//! ssh, disk, killed by the host: another try may pass, and is made automatically up to
//! `infra_retries`), `cancelled`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failure {
    Image,
    Infrastructure,
    Cancelled,
}

impl Failure {
    pub const ALL: [Failure; 3] = [Failure::Image, Failure::Infrastructure, Failure::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Image => "image",
            Failure::Infrastructure => "infrastructure",
            Failure::Cancelled => "cancelled",
        }
    }

    /// What an operator does about it, in a few words.
    pub fn advice(self) -> &'static str {
        match self {
            Failure::Image => "fix the kickstart or the repositories: the same input fails again",
            Failure::Infrastructure => "the host failed the build: another try may pass",
            Failure::Cancelled => "cancelled: submit it again if it is still wanted",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_read_and_write_as_their_names() {
        for f in Failure::ALL {
            let s = serde_json::to_string(&f).unwrap();
            assert_eq!(s, format!("\"{}\"", f.as_str()));
            assert_eq!(serde_json::from_str::<Failure>(&s).unwrap(), f);
        }
    }
}
