//! `spec.backup.schedule`: exactly the schedules a Kubernetes CronJob's
//! `.spec.schedule` takes, checked before the CronJob is written so a bad
//! one is a condition on the Tenant, not a refused write.
//!
//! Kubernetes validates the field with robfig/cron v3's `ParseStandard`
//! and then refuses any schedule containing `TZ` (since 1.25 the time zone
//! goes in the CronJob's `timeZone` field; `CRON_TZ=`/`TZ=` prefixes are
//! only kept on CronJobs that already had one). That dialect:
//!
//! - five fields: minute (0-59), hour (0-23), day of month (1-31), month
//!   (1-12 or `jan`..`dec`), day of week (0-6 or `sun`..`sat`; 7 is
//!   refused), names in any case;
//! - in each field a list (`,`) of `*`, `?` (the same as `*`), a value or a
//!   range `a-b`, each optionally stepped (`/n`, n > 0); a single value
//!   with a step, `a/n`, means `a-<max>/n`;
//! - or one of the macros `@yearly`, `@annually`, `@monthly`, `@weekly`,
//!   `@daily`, `@midnight`, `@hourly` (lower case, alone).
//!
//! The parser is the `croner` crate's (values, ranges, steps); in front of
//! it this module refuses what croner takes beyond that dialect (`L`, `W`,
//! `#`, `+`, seconds and year fields, 7 for Sunday, a step without a start)
//! and turns what only the dialect has into croner's form (macros, `?`
//! outside the day fields, `a/n`). robfig's `@every <duration>` is refused
//! too: the Kubernetes documentation does not offer it and its start is
//! the controller's restart, not a time of day. Pure.

use croner::parser::{CronParser, Seconds, Year};

/// The macros and the five fields each stands for.
const MACROS: [(&str, &str); 7] = [
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
    ("@monthly", "0 0 1 * *"),
    ("@weekly", "0 0 * * 0"),
    ("@daily", "0 0 * * *"),
    ("@midnight", "0 0 * * *"),
    ("@hourly", "0 * * * *"),
];

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// One field of the five: its name, largest value, and value names.
struct Field {
    what: &'static str,
    max: u32,
    names: &'static [&'static str],
}

const FIELDS: [Field; 5] = [
    Field {
        what: "minute",
        max: 59,
        names: &[],
    },
    Field {
        what: "hour",
        max: 23,
        names: &[],
    },
    Field {
        what: "day of month",
        max: 31,
        names: &[],
    },
    Field {
        what: "month",
        max: 12,
        names: &MONTHS,
    },
    Field {
        what: "day of week",
        max: 6,
        names: &DAYS,
    },
];

/// Checks a schedule as a Kubernetes CronJob's `.spec.schedule` would be
/// checked; the error says why it is refused.
pub fn check(s: &str) -> Result<(), String> {
    pattern(s)
        .and_then(|p| {
            CronParser::builder()
                .seconds(Seconds::Disallowed)
                .year(Year::Disallowed)
                .build()
                .parse(&p)
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .map_err(|e| format!("{s:?}: {e}"))
}

/// The schedule in croner's form, or why Kubernetes refuses it.
fn pattern(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("a schedule is required".into());
    }
    if s.contains("TZ") {
        return Err("Kubernetes refuses TZ or CRON_TZ in a CronJob schedule (schedules run in the time zone of the kube-controller-manager)".into());
    }
    if !s.starts_with('@') {
        return dialect(s);
    }
    match MACROS.iter().find(|(m, _)| *m == s) {
        Some((_, fields)) => Ok(fields.to_string()),
        None => Err(format!(
            "not a schedule macro; the macros are {}",
            MACROS.map(|(m, _)| m).join(", ")
        )),
    }
}

/// The five fields in croner's form, or why the dialect refuses them.
fn dialect(s: &str) -> Result<String, String> {
    let fields: Vec<&str> = s.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(format!(
            "{} fields; a schedule has 5 (minute hour day-of-month month day-of-week) or is a macro such as @daily",
            fields.len()
        ));
    }
    let mut out = Vec::with_capacity(5);
    for (text, field) in fields.iter().zip(&FIELDS) {
        let items: Vec<String> = text
            .split(',')
            .filter(|i| !i.is_empty())
            .map(|item| dialect_item(item, field))
            .collect::<Result<_, _>>()?;
        if items.is_empty() {
            return Err(format!("{}: {text:?} selects nothing", field.what));
        }
        out.push(items.join(","));
    }
    Ok(out.join(" "))
}

/// One list item: `*`, `?`, `a` or `a-b`, optionally `/n`.
fn dialect_item(item: &str, field: &Field) -> Result<String, String> {
    let what = field.what;
    let (range, step) = match item.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (item, None),
    };
    let step = match step {
        Some(n) => Some(number(n).ok_or_else(|| format!("{what}: step {n:?} of {item:?} is not a number"))?),
        None => None,
    };
    let range = match range {
        "*" | "?" => "*".to_string(),
        _ => {
            let ends: Vec<&str> = range.split('-').collect();
            if ends.len() > 2 {
                return Err(format!("{what}: {item:?} has too many hyphens"));
            }
            let values: Vec<u32> = ends.iter().map(|v| value(v, field)).collect::<Result<_, _>>()?;
            match (values.as_slice(), step) {
                ([a], Some(_)) => format!("{a}-{}", field.max),
                ([a], None) => a.to_string(),
                ([a, b], _) => format!("{a}-{b}"),
                _ => unreachable!("one or two ends"),
            }
        }
    };
    Ok(match step {
        Some(n) => format!("{range}/{n}"),
        None => range,
    })
}

/// A value: digits, or a name of the field's (any case); at most the
/// field's largest value (croner checks the rest of the bounds).
fn value(v: &str, field: &Field) -> Result<u32, String> {
    let what = field.what;
    if let Some(i) = field.names.iter().position(|n| n.eq_ignore_ascii_case(v)) {
        return Ok(i as u32 + u32::from(field.max == 12));
    }
    match number(v) {
        None => Err(format!("{what}: {v:?} is not a number")),
        Some(n) if n > field.max => Err(format!("{what}: {v} is above {}", field.max)),
        Some(n) => Ok(n),
    }
}

/// Digits, after at most one `+` (as Go's `strconv.Atoi` reads them); a
/// number too large for a u32 is none.
fn number(v: &str) -> Option<u32> {
    let digits = v.strip_prefix('+').unwrap_or(v);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Schedules a Kubernetes CronJob takes (robfig/cron v3 `ParseStandard`
    /// accepts them and none contains `TZ`).
    const ACCEPTED: &[&str] = &[
        "0 3 * * *",
        "*/15 * * * *",
        "0 0 1,15 * mon-fri",
        "5 4 * jan,jul 0",
        "5 4 * JAN,Jul SUN",
        "0 22 * * 1-5",
        "0 0 * * 6",
        "0 0 ? * ?",
        "? ? ? ? ?",
        "0 0-23/2 * * *",
        "5/15 * * * *",
        "0 0 1-31/10 * *",
        "59 23 31 12 6",
        "  0   3 * *\t* ",
        "0 0 * * *,",
        "0 0 * * mon,",
        "*/+5 * * * +1",
        "05 03 * * *",
        "*/100 * * * *",
        "@yearly",
        "@annually",
        "@monthly",
        "@weekly",
        "@daily",
        "@midnight",
        "@hourly",
    ];

    /// Schedules Kubernetes refuses (robfig refuses them, or they name a
    /// time zone); and `@every`, which this operator refuses on purpose.
    const REFUSED: &[&str] = &[
        "",
        "* * * *",
        "0 3 * * * *",
        "0 0 3 * * * 2030",
        "60 * * * *",
        "0 24 * * *",
        "0 0 0 * *",
        "0 0 32 * *",
        "0 0 * 13 *",
        "0 0 * 0 *",
        "0 0 * * 7",
        "*/0 * * * *",
        "/5 * * * *",
        "5-1 * * * *",
        "1-2-3 * * * *",
        "a b c d e",
        "0 0 * * monday",
        "0 0 L * *",
        "0 0 15W * *",
        "0 0 * * 5#3",
        "0 0 * * 5L",
        "0 0 * * -1",
        "0 0 * * +",
        "@DAILY",
        "@daily ",
        "@reboot",
        "@every 1h",
        "CRON_TZ=UTC 0 3 * * *",
        "TZ=Europe/Berlin 0 3 * * *",
    ];

    #[test]
    fn what_a_kubernetes_cronjob_accepts_is_accepted() {
        for s in ACCEPTED {
            check(s).unwrap_or_else(|e| panic!("{s:?} refused: {e}"));
        }
    }

    #[test]
    fn what_a_kubernetes_cronjob_refuses_is_refused_with_a_reason() {
        for s in REFUSED {
            let e = check(s).expect_err(s);
            assert!(!e.is_empty());
        }
        assert!(check("CRON_TZ=UTC 0 3 * * *").unwrap_err().contains("TZ"));
        assert!(check("@every 1h").unwrap_err().contains("macro"));
        assert!(check("0 0 * * 7").unwrap_err().contains("day of week"));
    }
}
