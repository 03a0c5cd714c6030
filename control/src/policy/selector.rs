//! Label selectors (`matchLabels`, `matchExpressions`) as NetworkPolicy uses them for pods
//! and namespaces: read once, refused where the API server would refuse them, then matched.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// One `matchExpressions` requirement.
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A label selector, checked for what the API server would refuse.
pub(super) struct Selector {
    labels: Vec<(String, String)>,
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The empty selector: every object.
    pub(super) fn everything() -> Selector {
        Selector {
            labels: Vec::new(),
            requirements: Vec::new(),
        }
    }

    /// The selector `s`, or why the API server would refuse it.
    pub(super) fn new(s: &LabelSelector) -> Result<Selector, String> {
        let mut requirements = Vec::new();
        for r in s.match_expressions.iter().flatten() {
            let values = r.values.clone().unwrap_or_default();
            let key = r.key.clone();
            let req = match r.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!(
                        "matchExpressions {:?} {}: needs values",
                        r.key, r.operator
                    ))
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!(
                        "matchExpressions {:?} {}: takes no values",
                        r.key, r.operator
                    ))
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    let known = "In, NotIn, Exists, DoesNotExist";
                    return Err(format!(
                        "matchExpressions {:?}: unknown operator {other:?} ({known})",
                        r.key
                    ));
                }
            };
            requirements.push(req);
        }
        Ok(Selector {
            labels: s
                .match_labels
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            requirements,
        })
    }

    /// Whether an object with `labels` is selected.
    pub(super) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.requirements.iter().all(|r| match r {
                Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
                Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
                Requirement::Exists(k) => labels.contains_key(k),
                Requirement::DoesNotExist(k) => !labels.contains_key(k),
            })
    }
}
