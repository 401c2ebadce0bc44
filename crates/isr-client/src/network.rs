//! IT's network policy of a parcel (set on the server by `isr-server parcel policy`) and the network a resume
//! gives the VM: the user's `--network` choice, unless the policy is `none`.

use isr_vmm::Network;
use serde::{Deserialize, Serialize};

/// The policy as this client last learnt it from the server (kept in the parcel's local state for
/// `--disconnected`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeenPolicy {
    /// No policy set: the user chooses.
    Unset,
    /// No network, whatever the user asks for.
    None,
    /// NAT allowed: the user chooses.
    Nat,
}

impl SeenPolicy {
    /// The server's `network_policy` field. A name this client does not know is read as `none`: an unknown
    /// restriction must not become no restriction.
    pub fn from_server(field: Option<&str>) -> SeenPolicy {
        match field {
            None => SeenPolicy::Unset,
            Some("nat") => SeenPolicy::Nat,
            Some("none") => SeenPolicy::None,
            Some(other) => {
                tracing::warn!("unknown network policy {other:?} from the server: treated as none");
                SeenPolicy::None
            }
        }
    }

    /// As `isr stat` shows it: `unset`, `none` or `nat`.
    pub fn as_str(self) -> &'static str {
        match self {
            SeenPolicy::Unset => "unset",
            SeenPolicy::None => "none",
            SeenPolicy::Nat => "nat",
        }
    }
}

/// The network the VM gets, and a note for the user when it is not what they asked for or the policy decided.
///
/// `policy` is `None` when this client never learnt the parcel's policy (a local state from before policies,
/// used `--disconnected`): then the VM gets no network until a connected resume learns it.
pub fn effective_network(
    parcel: &str,
    policy: Option<SeenPolicy>,
    requested: Network,
) -> (Network, Option<String>) {
    match policy {
        Some(SeenPolicy::None) => (
            Network::None,
            Some(format!(
                "IT's network policy for {parcel} is none: the VM runs without network{}",
                if requested == Network::Nat { " (--network nat does not apply)" } else { "" }
            )),
        ),
        Some(SeenPolicy::Unset | SeenPolicy::Nat) => (requested, None),
        None => (
            Network::None,
            Some(format!(
                "IT's network policy for {parcel} was never seen by this client: the VM runs without network \
                 until a connected resume learns it"
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_none_wins_and_the_others_let_the_user_choose() {
        for requested in [Network::Nat, Network::None] {
            let (net, note) = effective_network("p", Some(SeenPolicy::None), requested);
            assert_eq!(net, Network::None);
            assert!(note.unwrap().contains("IT's network policy for p is none"));
            for open in [SeenPolicy::Unset, SeenPolicy::Nat] {
                assert_eq!(effective_network("p", Some(open), requested), (requested, None));
            }
            assert_eq!(effective_network("p", None, requested).0, Network::None, "never seen: none");
        }
    }

    #[test]
    fn server_fields() {
        assert_eq!(SeenPolicy::from_server(None), SeenPolicy::Unset);
        assert_eq!(SeenPolicy::from_server(Some("nat")), SeenPolicy::Nat);
        assert_eq!(SeenPolicy::from_server(Some("none")), SeenPolicy::None);
        assert_eq!(SeenPolicy::from_server(Some("bridged")), SeenPolicy::None, "unknown means none");
        assert_eq!(serde_json::to_string(&SeenPolicy::Unset).unwrap(), "\"unset\"");
    }
}
