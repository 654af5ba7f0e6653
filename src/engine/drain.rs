//! Draining a host (issue 22, D7): while drained, a daemon claims nothing more. This is a stub
//! until the drain branch lands: it says the host is never drained.

use super::Engine;

impl Engine {
    /// Why this host is drained (`build-image drain --reason`), while it is; None otherwise.
    pub fn drained(&self) -> Option<String> {
        None
    }
}
