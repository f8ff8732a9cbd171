//! The committed CRDs are exactly what `tenant-operator crdgen` prints.

#[test]
fn committed_crds_match_the_generated_ones() {
    let generated = tenant_operator::api::crds_yaml().expect("CRDs serialize");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/crds.yaml");
    let committed = std::fs::read_to_string(path).expect("crds/crds.yaml exists");
    assert!(
        committed == generated,
        "crds/crds.yaml is stale: run `make crds` and commit the result"
    );
}

#[test]
fn tenant_crd_enforces_the_name_rule_and_bounds() {
    let yaml = tenant_operator::api::crds_yaml().unwrap();
    assert!(
        yaml.contains("self.metadata.name.size() <= 40"),
        "the CEL name rule is missing"
    );
    assert!(
        yaml.contains("maximum: 1000.0") && yaml.contains("minimum: 1.0"),
        "connectionLimit bounds are missing"
    );
    assert!(
        yaml.contains("scope: Cluster") && yaml.contains("- tn"),
        "scope or short name is wrong"
    );
}
