//! The index-version life cycle. Each (tenant, embedder fingerprint) is one version:
//! `building` (a migration target being filled) → `ready` (reindex finished) → `active` (a
//! replica started on it) → `retired` (another became active) → `deleted` (its table dropped
//! after the grace period). A migration back to a retired or deleted version starts it over
//! as `building`; a tenant's first version becomes `active` directly.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexVersionState {
    Building,
    Ready,
    Active,
    Retired,
    Deleted,
}

impl IndexVersionState {
    pub const ALL: [Self; 5] = [
        Self::Building,
        Self::Ready,
        Self::Active,
        Self::Retired,
        Self::Deleted,
    ];

    /// The name stored in the metadata database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Building => "building",
            Self::Ready => "ready",
            Self::Active => "active",
            Self::Retired => "retired",
            Self::Deleted => "deleted",
        }
    }

    /// Whether a version in state `from` (None: not recorded yet) may move to `self`.
    pub fn may_follow(self, from: Option<Self>) -> bool {
        use IndexVersionState::*;
        matches!(
            (from, self),
            (None | Some(Retired | Deleted), Building)
                | (Some(Building), Ready)
                | (None | Some(Ready | Active), Active)
                | (Some(Active), Retired)
                | (Some(Retired | Deleted), Deleted)
        )
    }

    /// Whether the version's table holds everything it should (a switch to it loses nothing).
    pub fn is_complete(self) -> bool {
        matches!(self, Self::Ready | Self::Active)
    }
}

impl fmt::Display for IndexVersionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown index version state `{0}`")]
pub struct UnknownState(pub String);

impl FromStr for IndexVersionState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// What preparing a migration target takes, from its recorded state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetPreparation {
    /// Not recorded: record it as `building`.
    Create,
    /// Retired or deleted earlier (a migration back): its table holds entries since deleted,
    /// so drop it and start over as `building`.
    StartOver,
    /// Being built (dual writes, an interrupted reindex): carry on.
    Continue,
    /// Ready or active already: nothing to build.
    Done,
}

pub fn target_preparation(state: Option<IndexVersionState>) -> TargetPreparation {
    match state {
        None => TargetPreparation::Create,
        Some(IndexVersionState::Retired | IndexVersionState::Deleted) => {
            TargetPreparation::StartOver
        }
        Some(IndexVersionState::Building) => TargetPreparation::Continue,
        Some(IndexVersionState::Ready | IndexVersionState::Active) => TargetPreparation::Done,
    }
}

#[cfg(test)]
mod tests {
    use super::IndexVersionState::*;
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for s in IndexVersionState::ALL {
            assert_eq!(s.as_str().parse::<IndexVersionState>(), Ok(s));
        }
        assert!("Active".parse::<IndexVersionState>().is_err());
    }

    #[test]
    fn the_life_cycle_allows_exactly_its_transitions() {
        let allowed = [
            (None, Building),
            (None, Active),
            (Some(Building), Ready),
            (Some(Ready), Active),
            (Some(Active), Active),
            (Some(Active), Retired),
            (Some(Retired), Deleted),
            (Some(Deleted), Deleted),
            (Some(Retired), Building),
            (Some(Deleted), Building),
        ];
        let froms = std::iter::once(None).chain(IndexVersionState::ALL.map(Some));
        for from in froms {
            for to in IndexVersionState::ALL {
                assert_eq!(
                    to.may_follow(from),
                    allowed.contains(&(from, to)),
                    "{from:?} -> {to}"
                );
            }
        }
    }

    #[test]
    fn preparing_a_target_follows_its_state() {
        assert_eq!(target_preparation(None), TargetPreparation::Create);
        assert_eq!(
            target_preparation(Some(Retired)),
            TargetPreparation::StartOver
        );
        assert_eq!(
            target_preparation(Some(Deleted)),
            TargetPreparation::StartOver
        );
        assert_eq!(
            target_preparation(Some(Building)),
            TargetPreparation::Continue
        );
        assert_eq!(target_preparation(Some(Ready)), TargetPreparation::Done);
        assert_eq!(target_preparation(Some(Active)), TargetPreparation::Done);
    }
}
