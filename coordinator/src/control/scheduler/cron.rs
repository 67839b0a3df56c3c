//! A small cron (`minute hour day-of-month month day-of-week`, with `*`, `a-b`, `a,b`,
//! `*/n`, `a-b/n`) evaluated in a time zone.
//!
//! Why our own: the scheduler needs one question only, "the latest slot at or before now",
//! which lets a new leader fire a slot the old one missed exactly once; a 100-line parser
//! answers it without another dependency.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    minutes: Vec<u32>,
    hours: Vec<u32>,
    dom: Vec<u32>,
    months: Vec<u32>,
    dow: Vec<u32>,
}

fn field(text: &str, lo: u32, hi: u32, what: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u32>()
                    .map_err(|_| format!("bad step in {what} {part:?}"))?,
            ),
            None => (part, 1),
        };
        if step == 0 {
            return Err(format!("step 0 in {what}"));
        }
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let a = a.parse().map_err(|_| format!("bad {what} {part:?}"))?;
            let b = b.parse().map_err(|_| format!("bad {what} {part:?}"))?;
            (a, b)
        } else {
            let v = range.parse().map_err(|_| format!("bad {what} {part:?}"))?;
            (v, if part.contains('/') { hi } else { v })
        };
        if a < lo || b > hi || a > b {
            return Err(format!("{what} {part:?} out of range {lo}-{hi}"));
        }
        out.extend((a..=b).step_by(step as usize));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

impl Cron {
    pub fn parse(text: &str) -> Result<Cron, String> {
        let f: Vec<&str> = text.split_whitespace().collect();
        let [m, h, dom, mon, dow] = f.as_slice() else {
            return Err(format!(
                "cron {text:?} needs 5 fields: minute hour day-of-month month day-of-week"
            ));
        };
        let mut dow = field(dow, 0, 7, "day-of-week")?;
        if dow.contains(&7) {
            dow.retain(|d| *d != 7);
            if !dow.contains(&0) {
                dow.insert(0, 0);
            }
        }
        Ok(Cron {
            minutes: field(m, 0, 59, "minute")?,
            hours: field(h, 0, 23, "hour")?,
            dom: field(dom, 1, 31, "day-of-month")?,
            months: field(mon, 1, 12, "month")?,
            dow,
        })
    }

    fn day_matches(&self, d: NaiveDate) -> bool {
        self.months.contains(&d.month())
            && self.dom.contains(&d.day())
            && self.dow.contains(&d.weekday().num_days_from_sunday())
    }

    /// The latest slot at or before `now`, looking back at most 366 days.
    pub fn latest_at_or_before(&self, tz: Tz, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = now.with_timezone(&tz);
        let today = local.date_naive();
        for back in 0..=366 {
            let day = today - Duration::days(back);
            if !self.day_matches(day) {
                continue;
            }
            for &h in self.hours.iter().rev() {
                for &m in self.minutes.iter().rev() {
                    let Some(naive) = day.and_hms_opt(h, m, 0) else {
                        continue;
                    };
                    // A local time skipped by a DST change has no slot; an ambiguous one
                    // takes its first occurrence.
                    let Some(t) = tz.from_local_datetime(&naive).earliest() else {
                        continue;
                    };
                    let t = t.with_timezone(&Utc);
                    if t <= now {
                        return Some(t);
                    }
                }
            }
        }
        None
    }
}

/// Local wall-clock "YYYY-MM-DD HH:MM" of a slot, for logs and keys.
pub fn slot_label(tz: Tz, slot: DateTime<Utc>) -> String {
    let l = slot.with_timezone(&tz);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}",
        l.year(),
        l.month(),
        l.day(),
        l.hour(),
        l.minute()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daily_2am_shanghai() {
        let c = Cron::parse("0 2 * * *").unwrap();
        let tz: Tz = "Asia/Shanghai".parse().unwrap();
        // 2024-05-01 01:30 Shanghai = 2024-04-30 17:30 UTC: the slot is the day before.
        let now = Utc.with_ymd_and_hms(2024, 4, 30, 17, 30, 0).unwrap();
        let s = c.latest_at_or_before(tz, now).unwrap();
        assert_eq!(s, Utc.with_ymd_and_hms(2024, 4, 29, 18, 0, 0).unwrap());
        let now = Utc.with_ymd_and_hms(2024, 4, 30, 18, 0, 0).unwrap();
        assert_eq!(c.latest_at_or_before(tz, now).unwrap(), now);
        assert_eq!(slot_label(tz, now), "20240501T0200");
    }

    #[test]
    fn lists_steps_and_refusals() {
        let c = Cron::parse("0 8,14,20 * * *").unwrap();
        let tz: Tz = "Asia/Shanghai".parse().unwrap();
        let now = Utc.with_ymd_and_hms(2024, 5, 1, 5, 0, 0).unwrap(); // 13:00 local
        assert_eq!(
            slot_label(tz, c.latest_at_or_before(tz, now).unwrap()),
            "20240501T0800"
        );
        let c = Cron::parse("0 */4 * * *").unwrap();
        assert_eq!(
            slot_label(tz, c.latest_at_or_before(tz, now).unwrap()),
            "20240501T1200"
        );
        assert!(Cron::parse("0 2 * *").is_err());
        assert!(Cron::parse("60 2 * * *").is_err());
        let weekly = Cron::parse("0 4 * * 0").unwrap(); // Sundays
        let s = weekly.latest_at_or_before(tz, now).unwrap();
        assert_eq!(slot_label(tz, s), "20240428T0400");
    }

    #[test]
    fn missed_slots_collapse_to_the_latest() {
        // No leader from 13:00 to 21:00 Shanghai: the 14:00 and 20:00 incrementals were
        // missed. The next leader sees only the latest slot, 20:00 (one run: not two, not
        // none), and the same slot until 08:00 the next day (FireSchedule then makes it once).
        let c = Cron::parse("0 8,14,20 * * *").unwrap();
        let tz: Tz = "Asia/Shanghai".parse().unwrap();
        let now = Utc.with_ymd_and_hms(2024, 5, 1, 13, 0, 0).unwrap(); // 21:00 local
        let slot = c.latest_at_or_before(tz, now).unwrap();
        assert_eq!(slot_label(tz, slot), "20240501T2000");
        let later = Utc.with_ymd_and_hms(2024, 5, 1, 23, 59, 0).unwrap(); // 07:59 local
        assert_eq!(c.latest_at_or_before(tz, later).unwrap(), slot);
    }
}
