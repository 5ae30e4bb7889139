//! Schedules: when periodic jobs fire.
//!
//! - [`cron`]: crontab expressions in IANA time zones.
//! - [`spec`]: a schedule's spec (cron or interval) and its fire times.
//! - [`policy`]: what to do when fire times come due (overlap, misfire, catch-up).
//! - [`record`]: a schedule as stored.

pub mod check;
pub mod cron;
pub mod policy;
pub mod record;
pub mod spec;
