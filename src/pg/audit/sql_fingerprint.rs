//! The rendered SQL, byte for byte: the installed functions are compared
//! by sha256(name:source), so a changed byte makes every tenant's
//! functions stale. The expected hashes were computed on the code before
//! `pg::audit` was split into a module directory.
use sha2::{Digest, Sha256};

use super::functions::function_bodies;
use super::*;
use crate::names::TenantName;

fn sha(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn fingerprints() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for tenant in ["acme", "a-b-9"] {
        let name = TenantName::parse(tenant).unwrap();
        for (f, body) in function_bodies(&name).unwrap() {
            out.push((format!("{tenant} body {f}"), sha(&body)));
        }
        for uid in ["0b9c-uid", "we\"ird'uid"] {
            out.push((
                format!("{tenant} anchor body {uid}"),
                sha(&anchor_function_body(&name, uid).unwrap()),
            ));
        }
        let mut actions = vec![
            AuditAction::CreateTables,
            AuditAction::ReplaceFunctions,
            AuditAction::GuardTable,
            AuditAction::SetPgauditLog,
            AuditAction::SeedHead,
        ];
        for table in ["orders", "we\"ird", "Mixed Case'q"] {
            actions.push(AuditAction::TriggerTable {
                table: table.into(),
                replace: false,
                args: vec![],
            });
            actions.push(AuditAction::TriggerTable {
                table: table.into(),
                replace: true,
                args: vec!["16384".into(), "it's \"x\" \\".into()],
            });
            actions.push(AuditAction::UntriggerTable { table: table.into() });
        }
        for (uid, role) in [("0b9c-uid", "tenancy_anchor_16384"), ("we\"ird'uid", "r\"o'le")] {
            actions.push(AuditAction::AnchorFunction {
                uid: uid.into(),
                role: role.into(),
            });
        }
        for a in &actions {
            out.push((
                format!("{tenant} render {a:?}"),
                sha(&render(a, &name).unwrap().join("\0")),
            ));
        }
    }
    out
}

const EXPECTED: &[(&str, &str)] = &[
    (
        "acme body _tenancy_audit_guard_acme",
        "17665729a44d4c1d6b6262a03850b1128b03e48dbb6fd0d115169ca208511a83",
    ),
    (
        "acme body _tenancy_audit_seal_acme",
        "d813f558d809ff70e865686c8829b2e450c5cc3276f5c5949a1c50111e8183c7",
    ),
    (
        "acme body _tenancy_audit_tail_acme",
        "4cfb71a76257a3116c57e56d843d2ea06837ec957049a3905586c0c1f1d86004",
    ),
    (
        "acme body _tenancy_audit_trigger_acme",
        "32a110b49553ed3f91a6638a31f1dcb975737883ba45a7481e9d2d9d535f91b0",
    ),
    (
        "acme body _tenancy_audit_write_acme",
        "410088a576677dec011c031c7663fe006da8b08757f1092ecc3b2942a2a61996",
    ),
    (
        "acme anchor body 0b9c-uid",
        "69fe1309dd31856a6ec0b4684d3605f1779af345091288adb2d9f5de80c55196",
    ),
    (
        "acme anchor body we\"ird'uid",
        "59fa3da6bff6196b9523a1c82faff70557d976f2dd4602c1cf65250e7489ffc8",
    ),
    (
        "acme render CreateTables",
        "ef09f1dc4c7af05d4bfa85d9bfb7e5714818a2c3425a7bb403291e8f7a83382c",
    ),
    (
        "acme render ReplaceFunctions",
        "f18730589f9536c7b4c66b0645603bc24bfcc971a319d5ec3e6a18f3ca36a169",
    ),
    (
        "acme render GuardTable",
        "bb38cd6c8295cf29d1df7dd30171127a3207f25e364381d4a268d6a15b4649f3",
    ),
    (
        "acme render SetPgauditLog",
        "e24a7385eb9b933edb8692515f7e68d09952e8598a3c3d03cff1258e9ddf23a5",
    ),
    (
        "acme render SeedHead",
        "c94853be1d7f3005b66004620b2b4a543e707217097c410cee97ab761f48504f",
    ),
    (
        "acme render TriggerTable { table: \"orders\", replace: false, args: [] }",
        "cef087e99cd2b94c8ce3ed410b42c97e7b1651c596f39cf87ab376d088d56eee",
    ),
    (
        "acme render TriggerTable { table: \"orders\", replace: true, args: [\"16384\", \"it's \\\"x\\\" \\\\\"] }",
        "11b1b854df878815712702c369eb5bdf6dd186212566e9d3f484b49202397c44",
    ),
    (
        "acme render UntriggerTable { table: \"orders\" }",
        "f3697412c7bc9582db29350efaf8ed531a951344047c1184cc11fc22432c9578",
    ),
    (
        "acme render TriggerTable { table: \"we\\\"ird\", replace: false, args: [] }",
        "5ce113828c948a3c0dda597d3a591795b9a4883efe5d708db0414c77e3092344",
    ),
    (
        "acme render TriggerTable { table: \"we\\\"ird\", replace: true, args: [\"16384\", \"it's \\\"x\\\" \\\\\"] }",
        "7a14c104ebe984de7ba2ae0980d477157965228fca1f5cfdc7c8c203a7dba07d",
    ),
    (
        "acme render UntriggerTable { table: \"we\\\"ird\" }",
        "247a30f76e44aef6776342d73bc027f7464c2358c9ccfd7b64cbbcf78064e927",
    ),
    (
        "acme render TriggerTable { table: \"Mixed Case'q\", replace: false, args: [] }",
        "0b203f6d682e53a89dba74a204eaddde8ec623d556b9a7fde69cd663a77b1e02",
    ),
    (
        "acme render TriggerTable { table: \"Mixed Case'q\", replace: true, args: [\"16384\", \"it's \\\"x\\\" \\\\\"] }",
        "4eb02ed1ac644016ecd18f776884f3fa255ad73b41a09f9956728e26d18506ac",
    ),
    (
        "acme render UntriggerTable { table: \"Mixed Case'q\" }",
        "8728617b58838af3b252037ebbe0f260121f50f16c7bb8075b21567d3f62175e",
    ),
    (
        "acme render AnchorFunction { uid: \"0b9c-uid\", role: \"tenancy_anchor_16384\" }",
        "71454569681c0a7c514d2693bd45b76f4fba6faa6ea0bb0318b7b14bf4280cbd",
    ),
    (
        "acme render AnchorFunction { uid: \"we\\\"ird'uid\", role: \"r\\\"o'le\" }",
        "a746ad33e8a816e0ed732bdf32ed2b339cd967ea82467e1b52ddf73a0ab5a277",
    ),
    (
        "a-b-9 body _tenancy_audit_guard_a_b_9",
        "6e1ce4a23431b403ab234c97b1261a43a6c72e0e1bf8b52e5d9ee599f60dd692",
    ),
    (
        "a-b-9 body _tenancy_audit_seal_a_b_9",
        "cc2a75e05f8b4c1a2df18c240da9c200073b0d82e057d904f14b39f320018dff",
    ),
    (
        "a-b-9 body _tenancy_audit_tail_a_b_9",
        "8920f0d428b66669bd975718305891921520fd315e194c18d93d15daa0b35618",
    ),
    (
        "a-b-9 body _tenancy_audit_trigger_a_b_9",
        "4dcddc873ac1c4ccb7a068aa112c3c572ac489162df4d7dd7e880c3db9ff9ed6",
    ),
    (
        "a-b-9 body _tenancy_audit_write_a_b_9",
        "2d65b935e6e581dcabc591c6e0e3c2e82db9f12fa42a889e4c96c851da8a61a2",
    ),
    (
        "a-b-9 anchor body 0b9c-uid",
        "83dc45f6dc8d3c92260229619d77edb2394fd02a7a38a6fe55645e7992a44da9",
    ),
    (
        "a-b-9 anchor body we\"ird'uid",
        "f5ffb71bbc83cc90343c2e0c043faabc2a7fd540d467370066c40ae2ebe69132",
    ),
    (
        "a-b-9 render CreateTables",
        "252153cf79cca8810a68462550053456700130d824730e2f9903016f19ef7225",
    ),
    (
        "a-b-9 render ReplaceFunctions",
        "113a530a31a4feee70bcdbb378a833444a04a979a2152c141948ed0f14d43ee1",
    ),
    (
        "a-b-9 render GuardTable",
        "6a0b57ae57c9d1f0bde721a4bc1fd7e7e18991567fc13fde67fbd824d2aa0430",
    ),
    (
        "a-b-9 render SetPgauditLog",
        "23ed449a4dd656ad60540ef5baa91083b523a003151e32cef4fd0d392bc95717",
    ),
    (
        "a-b-9 render SeedHead",
        "c3550ba44fe9b65bd2ab45e7d7b44eaae0710d682828d21a6531cbe75215918e",
    ),
    (
        "a-b-9 render TriggerTable { table: \"orders\", replace: false, args: [] }",
        "002e6a223bbc6bf10144d26c81a50f11355f787a1d3479d37012ecb101e0b4b5",
    ),
    (
        "a-b-9 render TriggerTable { table: \"orders\", replace: true, args: [\"16384\", \"it's \\\"x\\\" \\\\\"] }",
        "2bc612298996339b0d6588ef28278723642e09cc44ae036e4bda22701883794f",
    ),
    (
        "a-b-9 render UntriggerTable { table: \"orders\" }",
        "6d726b6e4e5023dd2556c060821f5c3db44350c08b82e499b5691e41164e9e55",
    ),
    (
        "a-b-9 render TriggerTable { table: \"we\\\"ird\", replace: false, args: [] }",
        "878156ba0ee368d6bbccb350c3667a314474f76b153137a151ff9ae0ccb8388f",
    ),
    (
        "a-b-9 render TriggerTable { table: \"we\\\"ird\", replace: true, args: [\"16384\", \"it's \\\"x\\\" \\\\\"] }",
        "8ebe496bfe2e448d7bfe1ca789f1a83314095ad991875d57dd8265954c1563ad",
    ),
    (
        "a-b-9 render UntriggerTable { table: \"we\\\"ird\" }",
        "b5cd8f84631816f694a2db0d14e932a35b3b1b573d8c3afa1a9a96780e5a68e7",
    ),
    (
        "a-b-9 render TriggerTable { table: \"Mixed Case'q\", replace: false, args: [] }",
        "1ff1e6f8df65392e99077b357c4eee59d10f623b03eb884966504114239ae7fa",
    ),
    (
        "a-b-9 render TriggerTable { table: \"Mixed Case'q\", replace: true, args: [\"16384\", \"it's \\\"x\\\" \\\\\"] }",
        "5d6f329716acf7011f004a26eb055e421e5bd12f987bf704d52440f9f6402fef",
    ),
    (
        "a-b-9 render UntriggerTable { table: \"Mixed Case'q\" }",
        "fdf47578ed20155119e50e819280cd876973f2478b36522f5d19f93de5bea6cc",
    ),
    (
        "a-b-9 render AnchorFunction { uid: \"0b9c-uid\", role: \"tenancy_anchor_16384\" }",
        "117ba4b03c0ad558a72328fbd747e8bdfa28b68ed4b080ff5d5f7860b176b04a",
    ),
    (
        "a-b-9 render AnchorFunction { uid: \"we\\\"ird'uid\", role: \"r\\\"o'le\" }",
        "15495f42142ce49284c0a390665b9640cd43e442a5f537639cbbb8c1e59831ee",
    ),
];

#[test]
fn rendered_sql_is_unchanged_byte_for_byte() {
    let got = fingerprints();
    let listing: String = got.iter().map(|(k, v)| format!("        ({k:?}, {v:?}),\n")).collect();
    assert_eq!(got.len(), EXPECTED.len(), "fingerprints:\n{listing}");
    for ((k, v), (ek, ev)) in got.iter().zip(EXPECTED) {
        assert_eq!((k.as_str(), v.as_str()), (*ek, *ev), "fingerprints:\n{listing}");
    }
}

/// The anchoring set-up's `DO` block, likewise (hash of the text since its
/// grants are made only when missing, stop 47; it is run, not installed, so
/// a change of it makes nothing stale).
#[test]
fn the_anchoring_setup_is_unchanged_byte_for_byte() {
    assert_eq!(
        sha(&super::functions::prepare_anchoring_sql().unwrap()),
        "9d6a2cecf122f04977f0eaa434c3a4561875b73a61852a7f1ddf10791efc8673"
    );
}
