//! Conditions as the controllers decide them ([`Cond`]: type, status,
//! reason, message) and as the status shows them (with
//! `lastTransitionTime` kept while the status holds). Pure; a leaf.

use crate::api::Condition;

/// A condition before timestamps: type, status, reason, message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Cond {
    pub fn new(type_: &'static str, status: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// Conditions from `conds`, keeping `lastTransitionTime` of those whose
/// status did not change (a type not in `conds` is dropped).
pub fn merge_conditions(old: &[Condition], conds: &[Cond], generation: Option<i64>, now: &str) -> Vec<Condition> {
    conds
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let since = old
                .iter()
                .find(|o| o.type_ == c.type_ && o.status == status)
                .map(|o| o.last_transition_time.clone())
                .unwrap_or_else(|| now.into());
            Condition {
                type_: c.type_.into(),
                status: status.into(),
                reason: c.reason.into(),
                message: c.message.as_str().into(),
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_flips() {
        let up = [Cond::new("Ready", true, "Ok", "ok")];
        let c1 = merge_conditions(&[], &up, Some(1), "t1");
        let c2 = merge_conditions(&c1, &[Cond::new("Ready", true, "Ok", "still")], Some(2), "t2");
        assert_eq!(
            (c2[0].last_transition_time.as_str(), c2[0].observed_generation),
            ("t1", Some(2))
        );
        let c3 = merge_conditions(&c2, &[Cond::new("Ready", false, "Down", "no")], Some(2), "t3");
        assert_eq!(
            (c3[0].status.as_str(), c3[0].last_transition_time.as_str()),
            ("False", "t3")
        );
        assert!(merge_conditions(&c3, &[], Some(2), "t4").is_empty());
    }
}
